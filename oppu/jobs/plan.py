"""A run's plan: every stage it will go through and that stage's size, known before the run starts.

`plan_run(cfg, data)` is a pure function of the resolved config and the sizes of the data it reads: per prompt
style one task-adaptation stage (`adapt:<task>:<style>`, its optimizer steps), per test user and adapter style
one training stage (`user:<id>:<style>`, its steps), and the generation rows (`generate`, one per user,
method and query). The steps are counted exactly as the training loops batch their examples
(`oppu.train.make_batches`: `epochs * ceil(examples / batch_size)`), so progress can be reported against the
plan from the first event on, and time left can be derived from measured step times
(`oppu.jobs.progress.summarize_progress`). `estimate_s` prices a plan with measured per-unit costs (the
sweep dialog's estimate).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("adapt", "user", "generate")
DEFAULT_UNIT_S = {"adapt": 1.0, "user": 0.5, "generate": 0.5}
"""Seconds per unit before anything was measured on this machine (a CPU step of the embedded 135M model)."""


@dataclass(frozen=True)
class Stage:
    key: str
    """The progress stage it reports as (`adapt:<task>:<style>`, `user:<id>:<style>`, `generate`)."""
    kind: str
    """`adapt` (task adaptation steps), `user` (per-user training steps) or `generate` (rows answered)."""
    total: int
    label: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def steps_for(examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a loop over `examples` (`oppu.train.make_batches`' count)."""
    return epochs * math.ceil(examples / batch_size) if examples > 0 else 0


def plan_run(cfg: Any, data: Any, done_users: Iterable[str] = ()) -> list[Stage]:
    """Every stage of a run of `cfg` (a `RunConfig`) over `data` (its `TaskData`), users in `done_users` left out
    (a resumed run skips them)."""
    from oppu.experiment import adapter_styles, run_styles, select_users, visible_history
    from oppu.tasks import get_task

    task = get_task(cfg.task)
    done = {str(u) for u in done_users}
    users = [u for u in select_users(data, cfg) if str(u.id) not in done]
    stages: list[Stage] = []
    if not users:
        return stages
    if cfg.task_adaptation and data.train_users:
        gold = sum(1 for user in data.train_users for q in user.queries if str(q.gold or "").strip())
        if cfg.adaptation_train.max_examples is not None:
            gold = min(gold, cfg.adaptation_train.max_examples)
        steps = steps_for(gold, cfg.adaptation_train.batch_size, cfg.adaptation_train.epochs)
        for style in run_styles(cfg):
            stages.append(Stage(f"adapt:{task.id}:{style.key}", "adapt", steps, f"task adaptation ({style.key})"))
    train = cfg.user_train
    for style in adapter_styles(cfg):
        for user in users:
            usable = sum(1 for item in visible_history(user, cfg.history_cutoff)
                         if task.history_example(item) is not None)
            if train.max_examples is not None:
                usable = min(usable, train.max_examples)
            stages.append(Stage(f"user:{user.id}:{style.key}", "user", steps_for(usable, train.batch_size,
                                                                                 train.epochs),
                                f"user {user.id} ({style.key})"))
    rows = sum(len(user.queries) for user in users) * len(cfg.methods)
    stages.append(Stage("generate", "generate", rows, "answering"))
    return stages


def plan_units(stages: Iterable[Stage | Mapping[str, Any]]) -> dict[str, int]:
    """Units (steps or rows) per kind of a plan."""
    out = dict.fromkeys(KINDS, 0)
    for stage in stages:
        kind, total = (stage.kind, stage.total) if isinstance(stage, Stage) else (stage["kind"], stage["total"])
        out[kind] = out.get(kind, 0) + int(total)
    return out


def estimate_s(stages: Iterable[Stage | Mapping[str, Any]], unit_s: Mapping[str, float] | None = None) -> float:
    """Seconds a plan should take at `unit_s` seconds per unit of each kind (measured, else `DEFAULT_UNIT_S`)."""
    costs = {**DEFAULT_UNIT_S, **(unit_s or {})}
    return sum(units * costs[kind] for kind, units in plan_units(stages).items())
