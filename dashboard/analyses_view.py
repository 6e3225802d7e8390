"""The paper's analyses as the Analyses page shows them: one registry entry per analysis (its store query, its
figure, its sweep) and the shortcut that submits a missing sweep as background jobs.

The sweeps themselves are `oppu.analyses.sweep_configs`'s (the same as `oppu sweep --kind`); the queries are the
store's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from dashboard import charts, forms
from dashboard.state import paths


@dataclass(frozen=True)
class Analysis:
    """One of the paper's analyses: the store query that aggregates it, its chart and its sweep kind."""

    title: str
    sweep: str
    """`oppu sweep --kind` / `oppu.analyses.sweep_configs` name."""
    query: str
    """Store method taking the task id."""
    chart: Callable[[pd.DataFrame, str, bool], Any]
    question: str
    varies: str
    """Column the sweep varies; with fewer than two values stored the figure is not an analysis yet."""

    def incomplete(self, frame: pd.DataFrame) -> bool:
        return frame[self.varies].nunique() < 2


ANALYSES: tuple[Analysis, ...] = (
    Analysis("Activity level", "activity", "activity_curve", charts.activity_curve,
             "Fig. 3: do users with longer histories gain more from a personal adapter? Users in equal-count bins "
             "by history size.", "bin"),
    Analysis("Retrieved items k", "k", "k_sweep", charts.k_sweep,
             "Fig. 4: how do OPPU + RAG and RAG alone change as more history items are retrieved?", "k"),
    Analysis("PEFT type", "peft", "peft_comparison", charts.peft_comparison,
             "LoRA, IA3 or prompt tuning as the personal module.", "peft"),
    Analysis("Behaviour shift", "behaviour-shift", "behaviour_shift", charts.behaviour_shift,
             "Training on older history only: does the adapter still help when the user's behaviour moves on?",
             "history_cutoff"),
    Analysis("History format", "history-format", "history_format", charts.history_format,
             "Retrieved items with all their fields against text only (labels and scores dropped).",
             "history_format"),
)


def submit_sweep(kind: str, task: str) -> list[str]:
    """Submit every run of one analysis for `task` as background jobs; returns their ids."""
    from oppu import jobs
    from oppu.analyses import sweep_configs

    base = forms.run_config(task, {"tag": kind})
    return [jobs.submit(cfg, str(paths().jobs)) for cfg in sweep_configs(kind, base)]
