"""OPPU Studio's Streamlit dashboard: `app.py` (navigation entry), `charts.py` (pure figure builders),
`widgets.py` (paths, cached core resources and queries, shared widgets). The page scripts live in `pages/`."""
