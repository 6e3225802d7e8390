"""Widgets the pages share: task, run and user pickers, the no-data message, chart downloads, and friendly
failure and flash messages.

They draw on the page; what they read comes from `dashboard.state`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard.state import available_tasks, latest_task, paths

log = logging.getLogger(__name__)


# -- messages ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def friendly(what: str) -> Iterator[None]:
    """Show a failure inside the block as one readable message instead of a traceback.

    Streamlit's own control flow (st.stop, reruns) derives from BaseException and passes through untouched.
    """
    try:
        yield
    except Exception as exc:  # the page must never show a traceback; the log keeps it
        log.exception("dashboard: %s failed", what)
        st.error(f"Could not {what}: {exc}")


def flash(message: str) -> None:
    """Keep a success message across the rerun that follows an action."""
    st.session_state["_flash"] = message


def show_flash() -> None:
    message = st.session_state.pop("_flash", None)
    if message:
        st.success(message)


def no_data_message(data_dir: Path) -> None:
    st.warning(f"No LaMP task folders found in `{data_dir}`. Point `OPPU_DATA` at a folder with one sub-folder "
               "per task (e.g. `data/demo/LaMP_2M/`), or create the demo data with `python data/generate.py`.")


# -- pickers ----------------------------------------------------------------------------------------------------


def task_picker(tasks: list[str], key: str, label: str = "Task") -> str | None:
    """A task selectbox starting on `?task=` from the URL, else the task chosen on another page, else the task
    of the newest run, else the default task (`RunConfig().task`, the README's LaMP_2M), else the first; the choice
    carries over to the other pages."""
    from oppu.config import RunConfig
    from oppu.tasks import get_task

    if not tasks:
        return None
    wanted = st.query_params.get("task")
    if wanted is not None and wanted not in tasks:
        st.warning(f"The link asks for task {wanted!r}, which is not available here ({', '.join(tasks)}).")
    candidates = (wanted, st.session_state.get("_task"), latest_task(), RunConfig().task)
    index = next((tasks.index(t) for t in candidates if t in tasks), 0)
    choice = st.selectbox(label, tasks, index=index, key=key,
                          format_func=lambda t: f"{t} · {get_task(t).name.replace('_', ' ')}")
    st.session_state["_task"] = choice
    return choice


def data_task_picker(key: str) -> str:
    """The task picker over the tasks with a data folder; with none, the no-data message, and the page stops."""
    tasks = available_tasks(paths().data)
    if not tasks:
        no_data_message(paths().data)
        st.stop()
    return task_picker(tasks, key=key)


def pick(label: str, options: list, key: str, url_param: str | None = None, **kwargs):
    """A selectbox that starts on the URL's `?<url_param>=` value when it is one of the options.

    Returns (choice, unknown) where `unknown` is the URL value that matched nothing (to tell the user), or None.
    """
    wanted = st.query_params.get(url_param) if url_param else None
    unknown = wanted if wanted is not None and wanted not in options else None
    index = options.index(wanted) if wanted in options else 0
    return st.selectbox(label, options, index=index, key=key, **kwargs), unknown


SCORING_LABELS: dict[str, str] = {"official": "Official (LaMP evaluation)",
                                  "lenient": "Lenient (answer extracted from free text)"}


def scoring_picker(key: str) -> str:
    """Official LaMP scoring (the default) or the lenient reading of the same answers; the gap between the two is
    how much of a score is answer extraction. The choice carries over to the other pages."""
    options = list(SCORING_LABELS)
    current = st.session_state.get("_scoring", "official")
    choice = st.radio("Scoring", options, index=options.index(current), key=key, horizontal=True,
                      format_func=SCORING_LABELS.__getitem__,
                      help="Official: the stripped raw answer must be exactly a label or a number, as LaMP's "
                           "evaluation reads it. Lenient: the label or number recovered from free text "
                           "(\"Comedy.\" -> comedy, \"4 stars\" -> 4).")
    st.session_state["_scoring"] = choice
    return choice


def run_label(runs: pd.DataFrame):
    """format_func for a run selectbox: "<created> · <tag> · <status>"."""
    info = runs.set_index("run_id")

    def label(run_id: str) -> str:
        row = info.loc[run_id]
        created = pd.Timestamp(row["created"]).strftime("%Y-%m-%d %H:%M") if pd.notna(row["created"]) else "?"
        tag = f" · {row['tag']}" if row.get("tag") else ""
        return f"{created}{tag} · {row['status']} · {run_id}"

    return label


# Orderings of the Data explorer's user list: keyword arguments of DataFrame.sort_values over `user_sizes`.
USER_ORDERS: dict[str, dict] = {
    "most active first": {"by": ["history_size", "user_id"], "ascending": [False, True]},
    "least active first": {"by": ["history_size", "user_id"], "ascending": [True, True]},
    "by id": {"by": ["user_id"], "ascending": [True]},
}


# -- downloads --------------------------------------------------------------------------------------------------


def download_chart(fig, frame: pd.DataFrame, stem: str) -> None:
    """CSV of the data, the chart as standalone HTML, and as PNG when kaleido can render it offline here.

    The files are built only when clicked (deferred callables): the HTML carries plotly.js (~4 MB) so it opens
    offline, and a first PNG render starts a headless Chromium (seconds).
    """
    row = st.container(horizontal=True)
    row.download_button("CSV", frame.to_csv(index=False).encode(), f"{stem}.csv", "text/csv",
                        key=f"csv-{stem}", icon=":material/download:", on_click="ignore")
    row.download_button("HTML", lambda: fig.to_html(include_plotlyjs=True, full_html=True).encode(),
                        f"{stem}.html", "text/html", key=f"html-{stem}", icon=":material/code:", on_click="ignore",
                        help="The interactive chart as one self-contained file.")
    if _kaleido_works():
        row.download_button("PNG", lambda: fig.to_image(format="png", scale=2), f"{stem}.png", "image/png",
                            key=f"png-{stem}", icon=":material/image:", on_click="ignore")
    else:
        st.caption("No PNG download: it needs the optional `kaleido` package and a Chrome/Chromium on this machine "
                   "(`pip install kaleido`). The camera icon on the chart saves a PNG from your browser.")


CHROME_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


@st.cache_resource(show_spinner=False)
def _kaleido_works() -> bool:
    """Whether plotly can write PNGs here: kaleido (v1) is installed and finds a local Chrome/Chromium, which it
    drives offline. Probed without rendering (a first render takes seconds); the PNG is made only on click."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("kaleido") is None:
        return False
    return bool(os.environ.get("BROWSER_PATH")) or any(shutil.which(name) for name in CHROME_NAMES)
