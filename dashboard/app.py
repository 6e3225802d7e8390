"""Entry point of the dashboard: `streamlit run dashboard/app.py` (or `oppu dashboard`).

Lists the pages explicitly with st.navigation: the page scripts live in the top-level `pages/` folder, which
Streamlit does not discover from an entry script in `dashboard/`.
"""

from __future__ import annotations

import streamlit as st

from dashboard.state import paths

PAGES = [
    st.Page("../pages/overview.py", title="Overview", icon=":material/home:", default=True),
    st.Page("../pages/data_explorer.py", title="Data explorer", icon=":material/person_search:"),
    st.Page("../pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("../pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("../pages/runs.py", title="Runs", icon=":material/table_rows:"),
    st.Page("../pages/analyses.py", title="Analyses", icon=":material/insights:"),
    st.Page("../pages/adapters.py", title="Adapters", icon=":material/folder_zip:"),
    st.Page("../pages/playground.py", title="Playground", icon=":material/chat:"),
]

st.set_page_config(page_title="OPPU Studio", page_icon=":material/person:", layout="wide")
page = st.navigation(PAGES)
with st.sidebar.expander("Folders", icon=":material/folder:"):
    where = paths()
    st.caption(f"data `{where.data}`  \nstore `{where.db}`  \njobs `{where.jobs}`  \nadapters `{where.artifacts}`")
page.run()
