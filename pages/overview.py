"""Overview page: what OPPU is, what is loaded, the latest runs and their metrics, a one-click demo experiment."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, forms, state, tables, widgets
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

def uncertainty_section(run_id: str, scoring: str) -> None:
    """The run's (or its seed group's) per-method means with 95% intervals and the key paired differences."""
    from oppu.uncertainty import difference_line, key_differences, summarize

    group = state.query("run_group", run_id)
    run_ids = tuple(state.query("group_runs", group)["run_id"]) if group else (run_id,)
    scores = state.query("scores", run_ids, scoring)
    if scores.empty:
        return
    try:
        result = summarize(scores, scoring)
    except ValueError as exc:  # e.g. a store with repeated rows: the metrics above still show
        st.caption(f"No intervals for this run: {exc}")
        return
    pooled = f"the {len(run_ids)} seeds of group `{group}`" if len(run_ids) > 1 else "this run"
    st.markdown(f"**How sure are these numbers?** Mean {result['metric']} per query over {pooled}, with 95% "
                "intervals from a bootstrap over users" + (" and seeds" if len(run_ids) > 1 else "") + ".")
    st.plotly_chart(charts.method_intervals(pd.DataFrame(result["summary"]), result["metric"],
                                            result["lower_is_better"]), width="stretch", key="overview-intervals")
    st.table(tables.interval_table(result))
    diffs = key_differences(scores, not result["lower_is_better"])
    for d in diffs:
        st.markdown(f"- {difference_line(d)} · wins/ties/losses {d['wins']}/{d['ties']}/{d['losses']}")
    if diffs:
        st.caption("Paired on the queries both methods answered; p from a sign-flip permutation test over users.")


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
            uncertainty_section(run_id, scoring)
