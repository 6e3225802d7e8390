"""The paper's analyses as the Analyses page shows them: one registry entry per analysis (its store query, its
figure, its sweep) and the panel that shows a sweep under way, or offers a missing one: what it would launch
(runs, users, estimated time), a confirmation, then one sweep of background jobs.

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


def analysis_frame(analysis: Analysis, task: str, scoring: str) -> tuple[pd.DataFrame, Any]:
    """The analysis table over comparable runs only (`oppu.analyses.comparable_runs`: runs that differ in the
    swept knob alone) and the `Comparison` saying which runs were used and why others were left out."""
    from dashboard import state
    from oppu.analyses import comparable_frame, comparable_runs

    runs = state.query("runs")
    if runs.empty:
        return pd.DataFrame(), comparable_runs(analysis.sweep, [])
    runs = runs[runs["task"] == task]
    comparison = comparable_runs(analysis.sweep, runs.to_dict("records"))
    return comparable_frame(analysis.sweep, state.query("analysis_cells", task, scoring), comparison), comparison


def sweep_members(kind: str, task: str) -> list[tuple[str, Any]]:
    """`(label, RunConfig)` per run of one analysis for `task`, from the dashboard's folders and defaults."""
    from oppu.analyses import sweep_members as members

    return members(kind, forms.run_config(task, {"tag": kind}))


def submit_sweep(kind: str, task: str) -> str:
    """Submit every run of one analysis for `task` as one sweep (a job per run, each labelled by its setting);
    returns the sweep id."""
    from oppu import jobs

    return jobs.submit_sweep(sweep_members(kind, task), str(paths().jobs), kind=kind)


def active_sweep(kind: str, task: str) -> dict | None:
    """The newest sweep of this analysis and task with members still queued or running, else None."""
    from oppu import jobs

    root = paths().jobs
    if not root.exists():
        return None
    groups = jobs.group_sweeps(jobs.list_jobs(str(root)))
    return next((g for g in groups if g["kind"] == kind and g["task"] == task and g["active"]), None)


def sweep_panel(analysis: Analysis, task: str, frame: pd.DataFrame) -> bool:
    """What the Analyses page shows above a figure whose sweep is missing or under way: a sweep in progress
    (the notice stays until its last run is finished), else the notice and a launcher that first shows what it
    would launch and asks to confirm. Returns True when there is no figure to draw."""
    import streamlit as st

    from dashboard.tables import duration

    running = active_sweep(analysis.sweep, task)
    missing = frame.empty or analysis.incomplete(frame)
    if running is not None:
        labels = ", ".join(f"{(j.get('sweep') or {}).get('label')} {j['state']}" for j in running["members"])
        st.info(f"The {analysis.title.lower()} sweep for {task} is under way: {running['done']} of "
                f"{running['planned']} runs done ({labels}). The figure fills in as runs finish; follow or cancel "
                "the sweep on **Train**.")
        return frame.empty
    if not missing:
        return False
    what = "No" if frame.empty else "Only one setting of"
    st.info(f"{what} {analysis.title.lower()} results for {task} yet. The shortcut below submits the sweep as "
            f"background jobs (`oppu sweep --kind {analysis.sweep} --task {task}` does the same).")
    asking = f"confirm-{analysis.sweep}"
    if st.button("Run this analysis", key=f"run-{analysis.sweep}", icon=":material/play_arrow:"):
        st.session_state[asking] = True
    if st.session_state.get(asking):
        from oppu.jobs.sweeps import preview

        members = sweep_members(analysis.sweep, task)
        plan = preview(members, paths().jobs)
        with st.container(border=True):
            how = "from step times measured on this machine" if plan["measured"] else \
                "a rough guess: no step times were measured here yet"
            st.markdown(f"**This launches {plan['runs']} runs** ({', '.join(label for label, _ in members)}) over "
                        f"{plan['users']} users, about **{duration(plan['seconds'])}** in all ({how}). Runs "
                        "with the same prompt style share one task-adapted base.")
            table = pd.DataFrame(plan["members"]).rename(columns={
                "label": "run", "adapt_steps": "task adaptation steps", "user_steps": "user steps",
                "seconds": "estimated"})
            table["estimated"] = table["estimated"].map(duration)
            st.dataframe(table, hide_index=True, width="stretch")
            go, stop = st.columns(2)
            if go.button(f"Launch {plan['runs']} runs", key=f"launch-{analysis.sweep}", type="primary"):
                sweep_id = submit_sweep(analysis.sweep, task)
                st.session_state[asking] = False
                st.success(f"Submitted sweep `{sweep_id}`: {plan['runs']} runs. Follow it on **Train**.")
            if stop.button("Don't launch", key=f"nolaunch-{analysis.sweep}"):
                st.session_state[asking] = False
                st.rerun()
    return frame.empty
