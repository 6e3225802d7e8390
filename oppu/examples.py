"""Examples and prompts: how one user's history (or other users' data, for task adaptation) becomes prompt /
target pairs, in the same prompt shape at training and at inference.

- A per-user example comes from THAT user's items only (`user_examples`); the official script built one list
  outside its user loop, so user i trained on users 0..i.
- A prompt for a retrieval style holds k retrieved EARLIER items of the same user (earlier by date when both
  dates are known, else earlier in the history list, as the official code did), and the profile for profile
  styles: train and test prompts have the same shape.
- Retrieval queries are built as OPPU builds them (`Task.retrieval_query`, `Task.history_query`): a query's
  instruction + text, and for a history item its OWN text, since an example's input may hold none (LaMP_7).
- Task adaptation (`adaptation_examples`) follows `task_LoRA.py`: other users' gold-labelled queries only, one
  prompt style per task-adapted base, retrieving from that user's own history.
- `trained_items` is what a manifest records: the ids and hash of the items an adapter saw.

No model, tokenizer or I/O here.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from oppu.model import items_hash
from oppu.retrieval import Retriever, is_before


@dataclass(frozen=True)
class PromptStyle:
    """Which personalization levers appear inside a prompt (training and inference alike)."""

    retrieval: bool = False
    profile: bool = False
    k: int = 0
    text_only: bool = False

    @property
    def key(self) -> str:
        parts = [p for p, on in (("rag", self.retrieval and self.k > 0), ("pag", self.profile)) if on]
        return "+".join(parts) or "plain"


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str
    source_id: str
    """Id of the history item or query the example was built from (for manifests and privacy checks)."""
    context_ids: tuple[str, ...] = ()
    """Ids of the retrieved items shown in the prompt (they are trained on too, as context)."""


def _earlier(history: Sequence[Any], index: int) -> list[Any]:
    """Items a history item may retrieve: strictly earlier by date when both are dated, else earlier in list."""
    item = history[index]
    out = []
    for j, other in enumerate(history):
        if j == index:
            continue
        both_dated = getattr(item, "date", None) and getattr(other, "date", None)
        if (both_dated and is_before(other.date, item.date)) or (not both_dated and j < index):
            out.append(other)
    return out


def _with_instruction(retriever: Retriever | None) -> bool:
    return bool(getattr(retriever, "query_instruction", True))


def build_prompt(task, input_text: str, style: PromptStyle, candidates: Sequence[Any],
                 retriever: Retriever | None, profile: str | None, before: str | None = None,
                 query: str | None = None) -> tuple[str, list]:
    """(prompt, retrieved [(item, score)]) for one input under a prompt style. Never sees a gold answer.

    The retriever matches `query` when given (a history item's `Task.history_query`), else the input's
    `Task.retrieval_query`, with the task's instruction when the retriever takes one.
    """
    retrieved: list = []
    if style.retrieval and style.k > 0 and retriever is not None and candidates:
        if query is None:
            query = task.retrieval_query(input_text, _with_instruction(retriever))
        retrieved = retriever.retrieve(query, candidates, style.k, before=before)
    prompt = task.prompt(input_text, retrieved=[item for item, _ in retrieved],
                         profile=profile if style.profile else None, text_only=style.text_only)
    return prompt, retrieved


def user_examples(task, history: Sequence[Any], style: PromptStyle, retriever: Retriever | None = None,
                  profile: str | None = None, max_examples: int | None = None, seed: int = 0) -> list[Example]:
    """One user's history items as training examples (the user's own items only).

    With `max_examples`, the user's MOST RECENT usable items are kept (by date, undated items by list position),
    chosen before retrieval runs: a very active user's recent behaviour is what their next queries follow (the
    demo data's behaviour shift, and real users' drifting taste), and older items still serve as retrieved
    context. `seed` is kept for callers; the choice itself is deterministic.
    """
    usable = [(i, pair) for i, item in enumerate(history) if (pair := task.history_example(item)) is not None]
    if max_examples is not None and len(usable) > max_examples:
        by_recency = sorted(usable, key=lambda x: (getattr(history[x[0]], "date", None) or "", x[0]))
        usable = sorted(by_recency[-max_examples:], key=lambda x: x[0])
    examples = []
    for index, (input_text, target) in usable:
        query = task.history_query(history[index], _with_instruction(retriever))
        prompt, retrieved = build_prompt(task, input_text, style, _earlier(history, index) if style.retrieval else (),
                                         retriever, profile, query=query)
        examples.append(Example(prompt, target, str(history[index].id),
                                tuple(str(item.id) for item, _ in retrieved)))
    return examples


def adaptation_examples(task, users: Sequence[Any], style: PromptStyle, retriever: Retriever | None,
                        seed: int, max_examples: int | None) -> list[Example]:
    """Task adaptation data for ONE prompt style, as `task_LoRA.py` builds it: the other users' queries with
    their gold outputs (never their history items as targets), each prompt retrieving from THAT user's history
    (items dated before the query) when the style retrieves, and holding that user's profile when the style
    has one and the data carries it.

    With `max_examples`, a seeded sample of the queries is drawn before prompts are built, so retrieval only
    runs for the examples kept.
    """
    slots = [(u, i) for u, user in enumerate(users) for i, q in enumerate(user.queries) if str(q.gold or "").strip()]
    if max_examples is not None and len(slots) > max_examples:
        slots = sorted(random.Random(seed).sample(slots, max_examples))
    examples = []
    for u, i in slots:
        user, query = users[u], users[u].queries[i]
        prompt, retrieved = build_prompt(task, query.input, style, user.history if style.retrieval else (),
                                         retriever, user.profile_text, before=query.date)
        examples.append(Example(prompt, query.gold, f"{user.id}/{query.id}",
                                tuple(f"{user.id}/{item.id}" for item, _ in retrieved)))
    return examples


def trained_items(task, items: Sequence[Any], examples: Sequence[Example]) -> tuple[list[str], str]:
    """(ids, hash) of the history items an adapter saw: its targets and their retrieved context, in history
    order. What a manifest records to prove the adapter holds this user's data only."""
    used = {ex.source_id for ex in examples} | {i for ex in examples for i in ex.context_ids}
    kept = [item for item in items if str(item.id) in used]
    return [str(i.id) for i in kept], items_hash([str(i.id) for i in kept], [task.format_item(i) for i in kept])
