"""Analyses page: the paper's figures from stored runs — activity level (Fig. 3), k (Fig. 4), PEFT type,
behaviour shift and history format — each downloadable, each with a shortcut that submits its sweep when missing.
Every bar and point carries a 95% interval (a bootstrap over users, every run a replicate of its setting) and
says how many users and queries it averages."""

from __future__ import annotations

import streamlit as st

from dashboard import analyses_view, state, widgets
from oppu.metrics import row_score_name

# The column each analysis's store query varies, as `Store.analysis_cells` names it.
VARIED = {"activity_curve": "bin", "k_sweep": "k", "peft_comparison": "peft", "behaviour_shift": "history_cutoff",
          "history_format": "history_format"}
# Bootstrap resamples behind the figures' error bars (`oppu results` uses 2000): enough for a bar's ends.
FIGURE_BOOT = 1000


def with_intervals(frame, used, query: str, task: str, scoring: str):
    """The analysis frame with ci_low, ci_high, n_users and n_queries per (setting, method), from the same
    runs (`used.run_ids`, the comparable ones) and the same activity bins as its points."""
    from oppu.uncertainty import grouped_intervals

    by = VARIED[query]
    cells = state.query("analysis_cells", task, scoring)
    if cells.empty or frame.empty:
        return frame
    cells = cells[cells["run_id"].isin(used.run_ids) & cells["method"].isin(set(frame["method"]))]
    if by == "bin":
        ranges = frame.drop_duplicates("bin")[["bin", "history_min", "history_max"]].itertuples(index=False)
        ranges = list(ranges)
        cells = cells.assign(bin=cells["history_size"].astype(int).map(
            lambda size: next((b for b, lo, hi in ranges if lo <= size <= hi), None)))
    cells = cells.assign(history_cutoff=cells["history_cutoff"].fillna("").astype(str))
    found = grouped_intervals(cells.dropna(subset=[by]), by, n_boot=FIGURE_BOOT)
    found[by] = found[by].astype(frame[by].dtype)
    return frame.merge(found[[by, "method", "ci_low", "ci_high", "n_users", "n_queries"]], on=[by, "method"],
                       how="left")


st.title("Analyses")
task = widgets.data_task_picker(key="analyses-task")
scoring = widgets.scoring_picker(key="analyses-scoring")
metric, lower = row_score_name(task, scoring)
st.caption(f"Every figure scores each stored answer of {task} by {metric} and averages over the runs of the task.")
tabs = st.tabs([a.title for a in analyses_view.ANALYSES])
for tab, analysis in zip(tabs, analyses_view.ANALYSES):
    with tab, widgets.friendly(f"show {analysis.title.lower()}"):
        st.caption(analysis.question)
        frame, used = analyses_view.analysis_frame(analysis, task, scoring)  # comparable runs only
        if analyses_view.sweep_panel(analysis, task, frame):  # a sweep under way, or the launcher of a missing one
            continue
        frame = with_intervals(frame, used, analysis.query, task, scoring)
        fig = analysis.chart(frame, metric, lower)
        st.plotly_chart(fig, width="stretch", key=f"chart-{analysis.sweep}")
        widgets.download_chart(fig, frame, f"{task}-{analysis.sweep}")
        st.caption(used.describe())
        if "n_users" in frame.columns:
            n = frame.dropna(subset=["n_users"])
            st.caption(f"Error bars: 95% intervals. Each point averages {int(n['n_users'].min())}–"
                       f"{int(n['n_users'].max())} users and {int(n['n_queries'].min())}–"
                       f"{int(n['n_queries'].max())} queries (hover a point for its own counts)."
                       if not n.empty else "No intervals: no scored answers behind these points.")
