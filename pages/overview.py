"""Overview page: what OPPU is, what is loaded, the latest runs and their metrics, a one-click demo experiment."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, forms, state, widgets
from oppu import jobs

where = state.paths()
st.title("OPPU Studio")
st.markdown(
    "**One PEFT Per User** gives every user a private parameter-efficient module (LoRA, IA3 or prompt tuning) trained "
    "only on that user's own history and plugged into a task-adapted base LLM. It can be combined with retrieval of "
    "the user's history (RAG) and a textual profile (PAG), and the user owns the module: export it, delete it.")
st.caption("Zhaoxuan Tan, Qingkai Zeng, Yijun Tian, Zheyuan Liu, Bing Yin, Meng Jiang. *Democratizing Large "
           "Language Models via Personalized Parameter-Efficient Fine-tuning.* EMNLP 2024.")

tasks = state.available_tasks(where.data)
model = state.default_model()
left, mid, right = st.columns(3)
left.metric("LaMP tasks with data", len(tasks), help=f"in `{where.data}`: {', '.join(tasks) or 'none'}")
with widgets.friendly("read the store"):
    counts = state.store_counts()
    mid.metric("Runs stored", counts.get("runs", 0))
    right.metric("Predictions stored", f"{counts.get('predictions', 0):,}")
st.caption(f"Model: `{model}` · data `{where.data}` · store `{where.db}`")
if not tasks:
    widgets.no_data_message(where.data)

st.subheader("Quick demo experiment")
st.write("Trains personal adapters for the two most active users of a task with short, bounded training (the "
         "`quick` preset) and compares non-personalized, RAG, OPPU and OPPU + RAG. It runs as a background job: "
         "follow it on **Train**.")
if tasks:
    demo_task = widgets.task_picker(tasks, key="demo-task")
    if st.button("Run the quick demo experiment", type="primary", icon=":material/play_arrow:"):
        with widgets.friendly("submit the demo job"):
            job_id = jobs.submit(forms.demo_config(demo_task), str(where.jobs))
            st.success(f"Submitted job `{job_id}`. Open **Train** to watch its progress.")

st.subheader("Latest runs")
with widgets.friendly("read the latest runs"):
    runs = state.query("latest_runs", 10)
    if runs.empty:
        st.info("No runs yet. Start the quick demo above, submit a job on **Train**, or run "
                "`oppu run --task LaMP_2M --users 4` in a terminal.")
    else:
        st.dataframe(runs[["run_id", "created", "status", "task", "tag", "model", "users", "predictions", "methods"]],
                     hide_index=True, width="stretch",
                     column_config={"created": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
                                    "methods": st.column_config.ListColumn()})
        run_id = st.selectbox("Metrics of run", list(runs["run_id"]), key="overview-run")
        scoring = widgets.scoring_picker(key="overview-scoring")
        metrics = state.query("run_metrics", run_id, scoring)
        if metrics.empty:
            st.info("This run has no metrics yet (it may still be running).")
        else:
            st.plotly_chart(charts.metric_bars(metrics, title=f"Run {run_id} · {widgets.SCORING_LABELS[scoring]}"),
                            width="stretch")
