"""Which queries a run answers: the test split (the users' real queries) or a validation split of their history.

Hyper-parameters must never be chosen on test queries. The validation split gives a tuner something else to score:
each test user's `n` most recent usable history items leave the history and become that user's queries, with the
item's own answer as gold (`Task.history_example`: the same LaMP-format input a training example has). The user's
adapter trains, and retrieval searches, on the remaining items only, so no held-out answer is ever seen; the test
queries are not read at all. The other users (task adaptation's data) are unchanged, so a validation run shares the
task-adapted base of the test runs it tunes for.

Only tasks whose history items carry both a query's text and its answer can be split this way. LaMP_1 items give a
paper title and its citation, not the two-candidate choice a LaMP_1 query asks; LaMP_7 items are tweets with no
source text to paraphrase. Both are refused with the reason, rather than scored on a task that is not theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from oppu.errors import OppuError

SPLITS = ("test", "validation")

VALIDATION_PREFIX = "val:"
"""Query ids of the validation split: the held-out item's id after this prefix (never a real query id)."""


class SplitError(OppuError, ValueError):
    """A split that cannot be built for this task or user."""


def unsupported_reason(task) -> str | None:
    """Why `task` has no validation split, or None when it has one."""
    if task.history_answers_queries:
        return None
    if not task.history_from_source:
        return f"{task.id}'s history items are the answers themselves, with no source text to ask about"
    return f"{task.id}'s history items do not ask the question its queries ask (nor have an answer one could have)"


def held_out_positions(task, history: Sequence[Any], n: int) -> list[int]:
    """Positions of the `n` most recent usable items (by date, undated items by position), in history order.

    The same recency order as `oppu.examples.user_examples` keeps for training, so the held-out items are exactly
    the ones a tuned adapter would have trained on first: the split asks about the user's latest behaviour."""
    usable = [i for i, item in enumerate(history) if task.history_example(item) is not None]
    by_recency = sorted(usable, key=lambda i: (getattr(history[i], "date", None) or "", i))
    return sorted(by_recency[-n:]) if n > 0 else []


def holdout_user(task, user, n: int):
    """`user` with their `n` most recent usable items moved from the history into the queries (gold = the item's
    answer). The shipped profile text is dropped: it was written from the whole history, held-out items included;
    a profile method rebuilds it from the remaining items."""
    from oppu.data import Query

    positions = held_out_positions(task, user.history, n)
    if len(positions) < n or len(positions) >= len(user.history):
        raise SplitError(f"user {user.id} has {len(positions)} usable history item(s) of {len(user.history)}: "
                         f"a validation split of {n} needs more than {n}; lower validation_items or pick other "
                         "users")
    held = set(positions)
    queries = []
    for i in positions:
        item = user.history[i]
        input_text, gold = task.history_example(item)
        queries.append(Query(f"{VALIDATION_PREFIX}{item.id}", input_text, gold, item.date))
    history = tuple(item for i, item in enumerate(user.history) if i not in held)
    return replace(user, history=history, queries=tuple(queries), profile_text=None)


def validation_data(data, task, n: int):
    """`data` (a TaskData) with every test user held out as `holdout_user` does; train users are unchanged.

    A test user whose history is too short to give up `n` items keeps it whole and gets no queries: never answered,
    never scored, so it cannot leak a test query into a validation score (the most active users, the ones a run
    picks, have histories far longer than `n`)."""
    reason = unsupported_reason(task)
    if reason is not None:
        raise SplitError(f"no validation split for {task.id}: {reason}. Tune on another task (LaMP_2N, LaMP_2M, "
                         "LaMP_3, LaMP_4 or LaMP_5) and carry the choice over")
    if n < 1:
        raise SplitError(f"validation_items must be >= 1 (got {n})")

    def split(user):
        try:
            return holdout_user(task, user, n)
        except SplitError:
            return replace(user, queries=(), profile_text=None)

    return replace(data, test_users=tuple(split(u) for u in data.test_users))


def run_data(cfg, task=None):
    """The TaskData a run with `cfg` works on: the data folder as read, or its validation split. The one place
    that applies `cfg.split`, used by the run itself and by everything that plans or counts its work."""
    from oppu.data import load_task_data
    from oppu.tasks import as_task

    task = as_task(task if task is not None else cfg.task)
    data = load_task_data(cfg.data_dir, task)
    if cfg.split == "validation":
        return validation_data(data, task, cfg.validation_items)
    return data
