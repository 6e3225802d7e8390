"""Runs page: every stored run with the knobs that differ between runs as columns (sortable, filterable); two or
more selected runs compared side by side (parameters, with "only differences", and metrics); a run's tag and
note; its CLI command; deleting a run with everything it produced, after a confirmation."""

from __future__ import annotations

import streamlit as st

from dashboard import jobs_view, state, widgets
from oppu import runs as core

st.title("Runs")
where = state.paths()
with widgets.friendly("read the runs"):
    stored = state.query("runs")
if stored.empty:
    st.info("No runs yet: train one on **Train** (or `oppu run`).")
    st.stop()

notes = core.read_notes(where.db)
table = core.runs_table(stored, notes)
f1, f2 = st.columns([1, 3])
tasks = sorted(table["task"].dropna().unique())
task = f1.selectbox("Task", ["every task", *tasks], key="runs-task")
search = f2.text_input("Filter (run id, tag, note or any knob value)", key="runs-filter")
shown = table if task == "every task" else table[table["task"] == task]
if search.strip():
    needle = search.strip().lower()
    shown = shown[shown.astype(str).apply(lambda row: needle in " ".join(row).lower(), axis=1)]
st.caption(f"{len(shown)} of {len(table)} runs. Columns after `note` are the settings that differ between runs; "
           "click a header to sort.")
picked = st.dataframe(shown, hide_index=True, width="stretch", on_select="rerun", selection_mode="multi-row",
                      key="runs-table")
rows = list(getattr(getattr(picked, "selection", None), "rows", []) or [])
chosen = [shown.iloc[i]["run_id"] for i in rows] or st.session_state.get("runs-chosen", [])
chosen = st.multiselect("Runs to work with", list(table["run_id"]), default=[r for r in chosen
                                                                              if r in set(table["run_id"])],
                        key="runs-chosen")
configs = {r: stored.loc[stored["run_id"] == r, "config"].iloc[0] for r in chosen}

if len(chosen) >= 2:
    st.subheader("Side by side")
    only = st.toggle("Only differences", value=True, key="runs-only-diff")
    st.dataframe(core.compare_params(configs, only_differences=only), width="stretch")
    with widgets.friendly("read the metrics"):
        metrics = core.compare_metrics({r: state.query("run_metrics", r) for r in chosen})
    if metrics.empty:
        st.caption("No metrics stored for these runs yet.")
    else:
        st.dataframe(metrics, width="stretch")

for run_id in chosen:
    with st.expander(f"Run `{run_id}`", expanded=len(chosen) == 1):
        command, missing = core.cli_command(configs[run_id])
        st.markdown("**Copy as CLI command**")
        st.code(command, language="bash")
        if missing:
            st.caption("Settings no flag expresses (put them in a preset): " + ", ".join(missing))
        tag_col, note_col = st.columns([1, 2])
        current = stored.loc[stored["run_id"] == run_id, "tag"].iloc[0] or ""
        tag = tag_col.text_input("Tag", value=current, key=f"runs-tag-{run_id}")
        note = note_col.text_area("Note", value=notes.get(run_id, ""), key=f"runs-note-{run_id}", height=80)
        if st.button("Save tag and note", key=f"runs-save-{run_id}", icon=":material/save:"):
            with widgets.friendly("save the tag and note"):
                from oppu.store import Store

                Store(where.db).set_tag(run_id, tag)
                core.set_note(where.db, run_id, note)
                st.cache_data.clear()
                st.success(f"Saved the tag and note of `{run_id}`.")
        with widgets.friendly("read the training curves"):
            curves = jobs_view.stored_curves_frame(state.query("train_curve", run_id))
        if curves.empty:
            st.caption("No training curves stored for this run (methods without an adapter train nothing).")
        else:
            st.markdown("**Training curves**: task adaptation per prompt style, each user's adapter per style.")
            jobs_view.curve_chart(curves, key=f"runs-curves-{run_id}")
        st.markdown("**Delete this run**: its predictions, metrics, training curves and adapters.")
        sure = st.checkbox(f"Yes, delete `{run_id}` for good", key=f"runs-sure-{run_id}")
        if st.button("Delete run", key=f"runs-delete-{run_id}", icon=":material/delete:", disabled=not sure,
                     type="primary"):
            with widgets.friendly("delete the run"):
                gone = core.delete_run(where.db, where.artifacts, run_id)
                st.cache_data.clear()
                st.success(f"Deleted `{run_id}`: {gone['predictions']} predictions and "
                           f"{len(gone['folders'])} adapter folder(s).")
