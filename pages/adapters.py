"""Adapters page: every user's personal adapter with its size, PEFT config, training items and loss; export one as
a zip or delete it (after a confirmation) — the user owns their module."""

from __future__ import annotations

import streamlit as st

from dashboard import widgets

st.title("Personal adapters")
where = widgets.paths()
widgets.show_flash()
with widgets.friendly(f"list the adapters in {where.artifacts}"):
    adapters = widgets.adapters()
    if adapters.empty:
        st.info(f"No personal adapters in `{where.artifacts}` yet. Methods starting with OPPU train one per user: "
                "submit a job on **Train**.")
        st.stop()

    st.dataframe(adapters.drop(columns=["path"]), hide_index=True, width="stretch",
                 column_config={"size": st.column_config.NumberColumn("size (KiB)", format="%.1f")})
    labels = {row.path: f"{row.user_id} · {row.task} · {row.run}" for row in adapters.itertuples()}
    chosen = st.selectbox("Adapter", list(labels), format_func=labels.get, key="adapter-pick")
    row = adapters[adapters["path"] == chosen].iloc[0]

    with st.expander("manifest.json"):
        st.json(widgets.adapter_manifest(chosen))
    export, delete = st.columns(2)
    export.download_button("Export as zip", lambda: widgets.adapter_zip(chosen),
                           f"adapter-{row['task']}-{row['user_id']}.zip", "application/zip",
                           icon=":material/download:", on_click="ignore", key="adapter-export")
    with delete:
        confirm = st.checkbox(f"Yes, delete user {row['user_id']}'s adapter for good", key=f"adapter-confirm-{chosen}")
        if st.button("Delete", disabled=not confirm, icon=":material/delete:", key="adapter-delete"):
            widgets.delete_adapter(chosen)
            widgets.flash(f"Deleted the adapter of user {row['user_id']} ({row['task']}, run {row['run']}).")
            st.rerun()
