"""Compare page: one user's queries side by side across every stored method — the paper's case study (Fig. 5).

For a task, run and user: input, gold and each method's answer with a correctness mark (or its error / ROUGE-L),
the items retrieval put in the prompt with their scores, and a filter to the queries where the methods disagree.
Above it, how sure the run's numbers are (95% intervals over users, and seeds for a seed group) and, for two
chosen methods, the queries each wins, ties and loses, with the table filtered to any of the three.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, state, tables, widgets
from oppu.metrics import row_score_name

MAX_DETAILS = 50  # expanders below the table; the table itself shows every query

st.title("Compare methods, query by query")
with widgets.friendly("read the stored runs"):
    runs = state.query("latest_runs", 200)
    if runs.empty:
        st.info("No runs yet. Submit one on **Train** (or the quick demo on **Overview**); its answers appear here.")
        st.stop()

    task = widgets.task_picker(list(dict.fromkeys(runs["task"])), key="compare-task")
    task_runs = runs[(runs["task"] == task) & (runs["predictions"] > 0)]
    if task_runs.empty:
        st.info(f"No run of {task} has stored answers yet; a running job adds them user by user.")
        st.stop()
    c1, c2 = st.columns(2)
    with c1:
        run_id, unknown_run = widgets.pick("Run (newest first)", list(task_runs["run_id"]), key="compare-run",
                                           url_param="run", format_func=widgets.run_label(task_runs))
    run_users = state.query("run_users", run_id)
    users = (run_users.groupby("user_id", sort=False)["history_size"].max()
             .sort_values(ascending=False, kind="stable"))
    with c2:
        user_id, unknown_user = widgets.pick(
            "User (most active first)", [str(u) for u in users.index], key="compare-user", url_param="user",
            format_func=lambda u: f"{u} · {users.get(u, 0):.0f} history items")
    for what, value, shown in (("run", unknown_run, run_id), ("user", unknown_user, user_id)):
        if value is not None:
            st.warning(f"The link asks for {what} {value!r}, which this store does not have; showing {shown}.")

    preds = state.predictions(run_id, task, user_id)
    scoring = widgets.scoring_picker(key="compare-scoring")
    name, lower = row_score_name(task, scoring)
    summary = state.method_summary(preds, task, scoring)
    cols = st.columns(max(len(summary), 1))
    for col, (method, value, help_text) in zip(cols, summary):
        col.metric(charts.method_label(method), value, help=help_text)
    st.caption(f"Per-method mean {name} for user {user_id} ({'lower' if lower else 'higher'} is better).")

    from oppu.uncertainty import difference_line, key_differences, summarize

    group = state.query("run_group", run_id)
    run_ids = tuple(state.query("group_runs", group)["run_id"]) if group else (run_id,)
    run_scores = state.query("scores", run_ids, scoring)
    with st.expander("How sure: every user of the run" + (f" and its {len(run_ids)} seeds" if group else ""),
                     expanded=True, icon=":material/bar_chart:"):
        result, why = None, "no scored answers in it yet"
        try:
            result = summarize(run_scores, scoring) if not run_scores.empty else None
        except ValueError as exc:  # e.g. a store with repeated rows: the per-user view still works
            why, run_scores = str(exc), run_scores.iloc[0:0]
        if result is None:
            st.caption(f"No intervals for this run: {why}")
        else:
            st.table(tables.interval_table(result))
            for d in key_differences(run_scores, not lower):
                st.markdown(f"- {difference_line(d)} · wins/ties/losses {d['wins']}/{d['ties']}/{d['losses']}")
            st.caption("95% intervals from a bootstrap over users" + (" and seeds" if group else "") + "; paired "
                       "differences on the queries both methods answered, p from a sign-flip test over users.")

    st.subheader("Two methods, query by query")
    methods = charts.sort_methods(preds["method"])
    p1, p2, p3 = st.columns([1, 1, 2], vertical_alignment="bottom")
    method_a = p1.selectbox("Method A", methods, index=methods.index("oppu") if "oppu" in methods else 0,
                            key="compare-a", format_func=charts.method_label)
    others = [m for m in methods if m != method_a] or [method_a]
    favourite_b = next((m for m in ("rag", "none") if m in others), others[0])
    method_b = p2.selectbox("Method B", others, index=others.index(favourite_b), key="compare-b",
                            format_func=charts.method_label)
    outcome = tables.query_outcomes(preds, method_a, method_b, scoring, lower)
    label_a, label_b = charts.method_label(method_a), charts.method_label(method_b)
    outcome_labels = {"all": "all queries", "a": f"{label_a} better", "tie": "tie", "b": f"{label_b} better"}
    counts = outcome.value_counts()
    show = p3.segmented_control("Show", list(outcome_labels), default="all", key="compare-outcome",
                                format_func=lambda o: f"{outcome_labels[o]} ({counts.get(o, 0)})"
                                if o != "all" else outcome_labels[o]) or "all"
    if not run_scores.empty and method_a != method_b and {method_a, method_b} <= set(run_scores["method"]):
        from oppu.stats import paired_difference
        from oppu.uncertainty import as_replicates

        try:
            d = paired_difference(as_replicates(run_scores), method_a, method_b, higher_is_better=not lower)
        except ValueError:  # the two methods share no scored query in this run
            d = None
    else:
        d = None
    if d is not None:
        d = {**d, "label_a": label_a, "label_b": label_b}
        st.caption(f"User {user_id}: {label_a} better on {counts.get('a', 0)}, tie on {counts.get('tie', 0)}, "
                   f"{label_b} better on {counts.get('b', 0)} queries. Every user of the run: "
                   f"{difference_line(d)}; {label_a} wins {d['wins']}, ties {d['ties']}, loses {d['losses']}.")
    if show != "all":
        preds = preds[preds["query_id"].isin(outcome.index[outcome == show])]

    only_disagree = st.toggle("Only queries where the methods disagree", key="compare-disagree")
    if only_disagree:
        preds = preds[preds["query_id"].astype(str).isin(state.disagreeing(run_id, user_id, scoring))]
    if preds.empty:
        st.info("The methods agree on every query of this user." if only_disagree and show == "all"
                else f"No query of this user where {outcome_labels[show]}." if show != "all"
                else "No stored answers for this user.")
        st.stop()

    from oppu.tasks import get_task

    spec = get_task(task)
    st.subheader(f"Side by side · user {user_id}")
    # the table shows the query's own text; the full input with its instructions is in the details below
    table = tables.side_by_side(preds.assign(input=preds["input"].map(spec.query_text)), spec.kind,
                                methods_first=charts.METHOD_ORDER, scoring=scoring)
    answers = [c for c in table.columns if c not in ("query", "input", "gold")]
    st.dataframe(table.style.map(tables.mark_style, subset=answers), hide_index=True, width="stretch",
                 key="side-by-side",
                 column_config={"query": st.column_config.TextColumn(width="small"),
                                "input": st.column_config.TextColumn(width="medium"),
                                "gold": st.column_config.TextColumn(width="small")})

    st.subheader("Inputs and retrieved items")
    for n, (query_id, rows) in enumerate(preds.groupby("query_id", sort=False)):
        if n == MAX_DETAILS:
            st.caption(f"Details of the first {MAX_DETAILS} queries shown; the table above has them all.")
            break
        with st.expander(f"Query {query_id} · gold: {rows['gold'].iloc[0]}", expanded=n == 0):
            st.text(rows["input"].iloc[0])
            for _, row in rows.iterrows():
                if row["retrieved"]:
                    st.markdown(f"**Retrieved for {charts.method_label(row['method'])}** (k={row['k']}, "
                                f"{row['retriever']})")
                    st.dataframe(pd.DataFrame(row["retrieved"]), hide_index=True, width="stretch")
