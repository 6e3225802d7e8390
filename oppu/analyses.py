"""The paper's analyses as lists of `RunConfig`: each sweep changes one knob of a base config and tags the runs.

- `k`: retrieved items in the prompt (Fig. 4), for the retrieval methods.
- `activity`: one run over many users; the store bins users by history size afterwards.
- `peft`: LoRA vs IA3 vs prompt tuning as the personal module.
- `history-format`: full history items vs text only (labels dropped).
- `behaviour-shift`: adapters and retrieval see only history before a cutoff date; no cutoff is the reference.

Pure: no model is loaded here (behaviour-shift reads the data's dates when no cutoffs are given).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from oppu.config import PeftConfig, RetrievalConfig, RunConfig

K_VALUES = (0, 1, 2, 4, 8)
ACTIVITY_USERS = 100
CUTOFF_QUANTILES = (0.5, 0.75)


def _k(base: RunConfig, values: Sequence[Any] | None) -> list[RunConfig]:
    return [base.replace(retrieval=RetrievalConfig(retriever=base.retrieval.retriever, k=int(k)), tag="k-sweep")
            for k in (values or K_VALUES)]


def _activity(base: RunConfig, values: Sequence[Any] | None) -> list[RunConfig]:
    users = int(values[0]) if values else max(base.users or 1, ACTIVITY_USERS)
    return [base.replace(users=users, user_ids=None, tag="activity")]


def _peft(base: RunConfig, values: Sequence[Any] | None) -> list[RunConfig]:
    return [base.replace(user_peft=PeftConfig(**{**vars(base.user_peft), "kind": kind}), tag="peft")
            for kind in (values or ("lora", "ia3", "prompt"))]


def _history_format(base: RunConfig, values: Sequence[Any] | None) -> list[RunConfig]:
    return [base.replace(history_format=fmt, tag="history-format") for fmt in (values or ("full", "text_only"))]


def data_cutoffs(base: RunConfig, quantiles: Sequence[float] = CUTOFF_QUANTILES) -> list[str]:
    """Cutoff dates at quantiles of the selected test users' dated history items."""
    from oppu.data import load_task_data
    from oppu.experiment import select_users

    data = load_task_data(base.data_dir, base.task)
    users = select_users(data, base)
    dates = sorted(item.date[:10] for user in users for item in user.history if item.date)
    if not dates:
        raise ValueError(f"behaviour-shift needs dated history items and {data.source} has none: pass cutoff "
                         "dates explicitly (e.g. --values 2020-06-01)")
    return sorted({dates[min(int(q * len(dates)), len(dates) - 1)] for q in quantiles})


def _behaviour_shift(base: RunConfig, values: Sequence[Any] | None) -> list[RunConfig]:
    cutoffs = [str(v) for v in values] if values else data_cutoffs(base)
    return [base.replace(history_cutoff=c, tag="behaviour-shift") for c in (None, *cutoffs)]


SWEEPS: dict[str, Callable[[RunConfig, Sequence[Any] | None], list[RunConfig]]] = {
    "k": _k,
    "activity": _activity,
    "peft": _peft,
    "history-format": _history_format,
    "behaviour-shift": _behaviour_shift,
}


LABELS: dict[str, Callable[[RunConfig], str]] = {
    "k": lambda c: f"k={c.retrieval.k}",
    "activity": lambda c: f"{c.users} users",
    "peft": lambda c: c.user_peft.kind,
    "history-format": lambda c: c.history_format,
    "behaviour-shift": lambda c: f"before {c.history_cutoff}" if c.history_cutoff else "no cutoff",
}
"""Each sweep's member label: the setting of its swept knob (what tells the sweep's jobs apart)."""


def sweep_members(kind: str, base: RunConfig, values: Sequence[Any] | None = None) -> list[tuple[str, RunConfig]]:
    """`(label, config)` per run of one analysis, e.g. `("k=4", cfg)`."""
    return [(LABELS[kind](cfg), cfg) for cfg in sweep_configs(kind, base, values)]


def sweep_configs(kind: str, base: RunConfig, values: Sequence[Any] | None = None) -> list[RunConfig]:
    """The runs of one analysis; `values` overrides the default sweep values (k list, PEFT kinds, cutoffs...)."""
    build = SWEEPS.get(kind)
    if build is None:
        raise ValueError(f"unknown sweep {kind!r}: use one of {', '.join(SWEEPS)}")
    return build(base, values)
