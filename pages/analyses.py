"""Analyses page: the paper's figures from stored runs — activity level (Fig. 3), k (Fig. 4), PEFT type,
behaviour shift and history format — each downloadable, each with a shortcut that submits its sweep when missing."""

from __future__ import annotations

import streamlit as st

from dashboard import analyses_view, state, widgets
from oppu.metrics import row_score_name

st.title("Analyses")
task = widgets.data_task_picker(key="analyses-task")
scoring = widgets.scoring_picker(key="analyses-scoring")
metric, lower = row_score_name(task, scoring)
st.caption(f"Every figure scores each stored answer of {task} by {metric} and averages over the runs of the task.")
tabs = st.tabs([a.title for a in analyses_view.ANALYSES])
for tab, analysis in zip(tabs, analyses_view.ANALYSES):
    with tab, widgets.friendly(f"show {analysis.title.lower()}"):
        st.caption(analysis.question)
        frame = state.query(analysis.query, task, scoring)
        if frame.empty or analysis.incomplete(frame):
            what = "No" if frame.empty else "Only one setting of"
            st.info(f"{what} {analysis.title.lower()} results for {task} yet. The shortcut below submits the "
                    f"sweep as background jobs (`oppu sweep --kind {analysis.sweep} --task {task}` does the same).")
            if st.button("Run this analysis", key=f"run-{analysis.sweep}", icon=":material/play_arrow:"):
                job_ids = analyses_view.submit_sweep(analysis.sweep, task)
                st.success(f"Submitted {len(job_ids)} job(s): {', '.join(job_ids)}. Follow them on **Train**.")
            if frame.empty:
                continue
        fig = analysis.chart(frame, metric, lower)
        st.plotly_chart(fig, width="stretch", key=f"chart-{analysis.sweep}")
        widgets.download_chart(fig, frame, f"{task}-{analysis.sweep}")
