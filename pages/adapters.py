"""Adapters page: every user's personal adapters with size, PEFT config, training items and final loss; export a
user's adapters of one run as a zip or delete them after a confirmation — the user owns their module."""

from __future__ import annotations

import streamlit as st

from dashboard import adapter_files, state, widgets

st.title("Personal adapters")
where = state.paths()
widgets.show_flash()
with widgets.friendly(f"list the adapters in {where.artifacts}"):
    adapters = adapter_files.list_adapters(where.artifacts)
    if adapters.empty:
        st.info(f"No personal adapters in `{where.artifacts}` yet. Methods starting with OPPU train one per user: "
                "submit a job on **Train**.")
        st.stop()

    st.dataframe(adapters.drop(columns=["folder"]), hide_index=True, width="stretch",
                 column_config={"size_kib": st.column_config.NumberColumn("size (KiB)", format="%.1f"),
                                "final_loss": st.column_config.NumberColumn("final loss", format="%.3f"),
                                "items": st.column_config.NumberColumn("items trained on"),
                                "methods": st.column_config.ListColumn()})

    st.subheader("Export or delete")
    folders = adapters.drop_duplicates("folder")
    labels = {r.folder: f"user {r.user_id} · {r.task} · run {r.run}" for r in folders.itertuples()}
    chosen = st.selectbox("A user's adapters of one run", list(labels), format_func=labels.get, key="adapter-pick")
    row = folders[folders["folder"] == chosen].iloc[0]
    for style, manifest in adapter_files.manifests(chosen, where.artifacts).items():
        with st.expander(f"manifest.json · {style}"):
            st.json(manifest, expanded=1)

    export, delete = st.columns(2)
    export.download_button("Export as zip", lambda: adapter_files.adapter_zip(chosen, where.artifacts),
                           f"adapter-{row['task']}-{row['user_id']}.zip", "application/zip",
                           icon=":material/download:", on_click="ignore", key="adapter-export",
                           help="The same zip as `oppu adapters export`; `oppu adapters import` restores it.")
    with delete:
        confirm = st.checkbox(f"Yes, delete user {row['user_id']}'s adapters of this run for good",
                              key=f"adapter-confirm-{chosen}")
        if st.button("Delete", disabled=not confirm, icon=":material/delete:", key="adapter-delete"):
            adapter_files.delete_adapter(chosen, where.artifacts)
            widgets.flash(f"Deleted the adapters of user {row['user_id']} ({row['task']}, run {row['run']}).")
            st.rerun()

    st.subheader("Update on new items")
    st.caption("Continue training this user's adapters on new history items only (a JSON list in the task's "
               "history format); the manifest records the lineage, and a failed update leaves them as they were.")
    new_items = st.file_uploader("New history items (JSON)", type=["json"], key="adapter-update-file")
    if st.button("Update", disabled=new_items is None, icon=":material/update:", key="adapter-update"):
        import os

        from oppu.adapters import launch_update

        log = launch_update(chosen, new_items.getvalue(), where.artifacts, os.environ.get("OPPU_MODEL"))
        widgets.flash(f"Updating user {row['user_id']}'s adapters in the background; log: `{log}`.")
        st.rerun()

