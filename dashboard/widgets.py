"""Shared dashboard plumbing: where things live (env vars), cached core resources and queries, small widgets.

Pages stay thin by calling these. Paths come from `OPPU_DATA`, `OPPU_DB`, `OPPU_JOBS` and `OPPU_ARTIFACTS` so tests
(and users) can point the app at other folders. Queries are cached for a few seconds only: training workers write
the store while the dashboard reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, tables

log = logging.getLogger(__name__)

QUERY_TTL_S = 3


@dataclass(frozen=True)
class Paths:
    """The four locations the dashboard reads and writes."""

    data: Path
    db: Path
    jobs: Path
    artifacts: Path


def paths_from_env(env: Mapping[str, str] = os.environ) -> Paths:
    return Paths(
        data=Path(env.get("OPPU_DATA", "data/demo")),
        db=Path(env.get("OPPU_DB", "runs/oppu.duckdb")),
        jobs=Path(env.get("OPPU_JOBS", "runs/jobs")),
        artifacts=Path(env.get("OPPU_ARTIFACTS", "runs/artifacts")),
    )


def paths() -> Paths:
    return paths_from_env()


# -- friendly failure -------------------------------------------------------------------------------------------


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


# -- the results store ------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def _store(db: str):
    """The Store for a db path, made once per process (it keeps no connection open: each query opens its own)."""
    from oppu.store import Store

    return Store(db)


@st.cache_data(ttl=QUERY_TTL_S, show_spinner=False)
def _query(db: str, name: str, args: tuple):
    return getattr(_store(db), name)(*args)


def query(name: str, *args):
    """A cached read query of the store by method name, e.g. `query("run_users", run_id)` (a DataFrame; `counts`
    gives a dict).

    An absent database file reads as an empty store, so a fresh checkout shows "no runs yet" instead of an error.
    """
    db = paths().db
    if not db.exists():
        return pd.DataFrame()
    return _query(str(db), name, tuple(args))


def store_counts() -> dict[str, int]:
    """Headline counts (`runs`, `predictions`, `users`, ...); empty when there is no store yet."""
    counts = query("counts")
    return dict(counts) if isinstance(counts, Mapping) else {}


def run_metrics(run_id: str) -> pd.DataFrame:
    """A run's metrics as long rows (`method`, `metric`, `value`)."""
    return query("run_metrics", run_id)


def score_name(task: str) -> tuple[str, bool]:
    """(name, lower_is_better) of the per-row score the store keeps for this task (accuracy, abs. error, ROUGE-L)."""
    from oppu.store import row_score_name

    return row_score_name(task)


def run_label(runs: pd.DataFrame):
    """format_func for a run selectbox: "<created> · <tag> · <status>"."""
    info = runs.set_index("run_id")

    def label(run_id: str) -> str:
        row = info.loc[run_id]
        created = pd.Timestamp(row["created"]).strftime("%Y-%m-%d %H:%M") if pd.notna(row["created"]) else "?"
        tag = f" · {row['tag']}" if row.get("tag") else ""
        return f"{created}{tag} · {row['status']} · {run_id}"

    return label


def predictions(run_id: str, task: str, user_id: str) -> pd.DataFrame:
    """The user's stored answers for every method, with the query `input` and each retrieved item's text taken
    from the task data (the store keeps ids and scores only); the prompt stands in when the data is elsewhere."""
    preds = query("predictions_for", run_id, user_id)
    if preds.empty:
        return preds
    inputs, texts = {}, {}
    with contextlib.suppress(Exception):  # the run may come from another data folder: fall back to the prompt
        from oppu.tasks import get_task

        user = task_data(task).user(user_id)
        inputs = {q.id: q.input for q in user.queries}
        spec = get_task(task)
        texts = {item.id: spec.format_item(item) for item in user.history}
    preds = preds.assign(input=[inputs.get(str(q), p) for q, p in zip(preds["query_id"], preds["prompt"])])
    retrieved = [
        [{"rank": i + 1, "id": str(item_id), "score": float(sc), "item": texts.get(str(item_id), "")}
         for i, (item_id, sc) in enumerate(zip(_as_list(ids), _as_list(scores)))]
        for ids, scores in zip(preds["retrieved_ids"], preds["retrieved_scores"])]
    return preds.assign(retrieved=retrieved)


def _as_list(value) -> list:
    """A DuckDB list cell (list, numpy array or NULL) as a plain list."""
    return [] if value is None or isinstance(value, float) else list(value)


def disagreeing(run_id: str, user_id: str) -> set[str]:
    """Query ids where the stored methods give different answers (computed in DuckDB)."""
    frame = query("methods_disagree", run_id, user_id)
    return set() if frame.empty else set(frame["query_id"].astype(str))


def method_summary(preds: pd.DataFrame, task: str) -> list[tuple[str, str, str]]:
    """(method, mean per-row score as text, what the score is) per method, in the dashboard's method order."""
    name, lower = score_name(task)
    means = preds.groupby("method")["correct"].mean()
    counts = preds["method"].value_counts()
    direction = "lower" if lower else "higher"
    return [(m, "–" if pd.isna(means[m]) else f"{means[m]:.2f}",
             f"mean {name} over this user's {counts[m]} queries ({direction} is better)")
            for m in charts.sort_methods(means.index)]


# -- jobs -------------------------------------------------------------------------------------------------------


def default_model() -> str:
    """The base model new jobs use: `OPPU_MODEL` when set (tests point it at a tiny model), else the embedded one."""
    from oppu.config import EMBEDDED_MODEL

    return os.environ.get("OPPU_MODEL", EMBEDDED_MODEL)


def run_config(**fields):
    """A RunConfig writing to this dashboard's data, store and artifact folders; raises ConfigError on bad input."""
    from oppu.config import RunConfig

    where = paths()
    return RunConfig(data_dir=str(where.data), db=str(where.db), artifacts_dir=str(where.artifacts), **fields)


def demo_config(task: str):
    """The Overview page's quick demo: the project's `quick` preset (the same as `oppu run --preset quick`: two
    most active users, the paper's four core methods, short bounded training) on this dashboard's folders."""
    from oppu.config import RunConfig
    from oppu.config import load_preset, merge_config

    where = paths()
    here = {"task": task, "data_dir": str(where.data), "db": str(where.db), "artifacts_dir": str(where.artifacts),
            "model": {"name": default_model()}, "tag": "quick-demo"}
    return RunConfig.from_dict(merge_config(RunConfig().to_dict(), load_preset("quick"), here))


def submit_job(cfg) -> str:
    """Start `cfg` as a background job (a separate worker process) and return its id at once."""
    from oppu import jobs

    return jobs.submit(cfg, str(paths().jobs))


ACTIVE_STATES = ("queued", "running")


def train_config(*, task: str, n_users: int, user_ids: list[str], methods: list[str], peft_kind: str, rank: int,
                 retriever: str, k: int, epochs: int, lr: float, model: str, task_adaptation: bool = True,
                 batching: str = "multi_lora"):
    """The Train form's RunConfig; every check is RunConfig's own, so a bad value raises its ConfigError."""
    import dataclasses

    from oppu.config import ModelConfig, RetrievalConfig, RunConfig

    defaults = RunConfig()
    return run_config(
        task=task, methods=tuple(methods), users=n_users, user_ids=tuple(user_ids) if user_ids else None,
        model=ModelConfig(name=model),
        user_peft=dataclasses.replace(defaults.user_peft, kind=peft_kind, r=rank, alpha=rank),
        retrieval=RetrievalConfig(retriever=retriever, k=k),
        user_train=dataclasses.replace(defaults.user_train, epochs=epochs, lr=lr),
        task_adaptation=task_adaptation, batching=batching,
    )


def jobs() -> list[dict]:
    """Every job under OPPU_JOBS, newest first, as `oppu.jobs.get_job` describes it."""
    from oppu import jobs as core

    root = paths().jobs
    if not root.exists():
        return []
    return list(core.list_jobs(str(root)))


def jobs_frame(job_list: list[dict]) -> pd.DataFrame:
    rows = [{"job": j["id"], "state": j["state"], "task": j.get("task"), "stage": j.get("stage"),
             "users done": f"{j.get('users_done') or 0}/{j.get('users_total') or '?'}",
             "elapsed": tables.duration(j.get("elapsed_s")), "run": j.get("run_id"), "error": j.get("error")}
            for j in job_list]
    return pd.DataFrame(rows)


def _loss_frame(job: dict) -> pd.DataFrame:
    return pd.DataFrame(job.get("losses") or [], columns=["step", "loss", "user_id"])


def job_card(job: dict) -> None:
    """One running job: stage, user i of N, loss curve, time left, cancel."""
    from oppu import jobs as core

    with st.container(border=True):
        head, button = st.columns([5, 1])
        head.markdown(f"**Job `{job['id']}`** · {job.get('task', '')} · {job['state']}")
        if button.button("Cancel", key=f"cancel-{job['id']}", icon=":material/stop:"):
            core.cancel(str(paths().jobs), job["id"])
            st.toast(f"Cancelling {job['id']}: the worker stops after the current step.")
        total = job.get("users_total") or 0
        # `progress` (0..1) counts finished users plus the current user's share of its steps
        fraction = job.get("progress")
        if fraction is None:
            fraction = (job.get("users_done") or 0) / total if total else 0.0
        st.progress(min(max(float(fraction), 0.0), 1.0),
                    text=f"{job.get('stage') or 'starting'} · user {job.get('user_index') or 0} of {total or '?'} · "
                         f"step {job.get('step') or 0} · elapsed {tables.duration(job.get('elapsed_s'))} · "
                         f"time left {tables.duration(job.get('eta_s'))}")
        losses = _loss_frame(job)
        if not losses.empty:
            st.plotly_chart(charts.loss_curve(losses), width="stretch", key=f"loss-{job['id']}")


def job_details(job: dict) -> None:
    """A job's outcome: its error when it failed, resume when it stopped early, the loss curve and log tail."""
    from oppu import jobs as core

    root = str(paths().jobs)
    if job["state"] == "failed":
        st.error(f"Job {job['id']} failed: {job.get('error') or 'no error message was recorded'}")
    elif job["state"] == "interrupted":
        st.warning(f"Job {job['id']} was interrupted (its worker stopped without finishing). Resume continues "
                   "the same run; users already finished are kept.")
    elif job["state"] == "cancelled":
        st.info(f"Job {job['id']} was cancelled. Resume continues the same run.")
    elif job["state"] == "done":
        st.success(f"Job {job['id']} finished: run `{job.get('run_id')}`. See it on **Compare**.")
    if job["state"] in core.RESUMABLE_STATES and st.button("Resume", key=f"resume-{job['id']}",
                                                      icon=":material/replay:"):
        core.resume(root, job["id"])
        st.toast(f"Resumed {job['id']}: users already finished are skipped.")
    losses = _loss_frame(job)
    if not losses.empty:
        st.plotly_chart(charts.loss_curve(losses), width="stretch", key=f"detail-loss-{job['id']}")
    with st.expander("Worker log (last lines)"):
        st.code(core.logs(root, job["id"], tail=40) or "(empty)", language=None)


# -- analyses ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """One of the paper's analyses: the store query that aggregates it, its chart and its sweep kind."""

    title: str
    sweep: str
    """`oppu sweep --kind` / `oppu.analyses.sweep_configs` name."""
    query: str
    """Store method taking the task id."""
    chart: Callable[[pd.DataFrame, str, bool], Any]
    question: str
    varies: str
    """Column the sweep varies; with fewer than two values stored the figure is not an analysis yet."""

    def incomplete(self, frame: pd.DataFrame) -> bool:
        return frame[self.varies].nunique() < 2


ANALYSES: tuple[Analysis, ...] = (
    Analysis("Activity level", "activity", "activity_curve", charts.activity_curve,
             "Fig. 3: do users with longer histories gain more from a personal adapter? Users in equal-count bins "
             "by history size.", "bin"),
    Analysis("Retrieved items k", "k", "k_sweep", charts.k_sweep,
             "Fig. 4: how do OPPU + RAG and RAG alone change as more history items are retrieved?", "k"),
    Analysis("PEFT type", "peft", "peft_comparison", charts.peft_comparison,
             "LoRA, IA3 or prompt tuning as the personal module.", "peft"),
    Analysis("Behaviour shift", "behaviour-shift", "behaviour_shift", charts.behaviour_shift,
             "Training on older history only: does the adapter still help when the user's behaviour moves on?",
             "history_cutoff"),
    Analysis("History format", "history-format", "history_format", charts.history_format,
             "Retrieved items with all their fields against text only (labels and scores dropped).",
             "history_format"),
)


def analysis_frame(analysis: Analysis, task: str) -> pd.DataFrame:
    return query(analysis.query, task)


def submit_sweep(kind: str, task: str) -> list[str]:
    """Submit every run of one analysis for `task` as background jobs; returns their ids."""
    from oppu.analyses import sweep_configs

    base = run_config(task=task, model=_model_config(), tag=kind)
    return [submit_job(cfg) for cfg in sweep_configs(kind, base)]


def _model_config():
    from oppu.config import ModelConfig

    return ModelConfig(name=default_model())


# -- adapters ---------------------------------------------------------------------------------------------------


def flash(message: str) -> None:
    """Keep a success message across the rerun that follows an action."""
    st.session_state["_flash"] = message


def show_flash() -> None:
    message = st.session_state.pop("_flash", None)
    if message:
        st.success(message)


def adapters() -> pd.DataFrame:
    from dashboard.adapter_files import list_adapters

    return list_adapters(paths().artifacts)


def adapter_manifests(folder: str) -> dict[str, dict]:
    from dashboard.adapter_files import manifests

    return manifests(folder, paths().artifacts)


def adapter_zip(folder: str) -> bytes:
    from dashboard.adapter_files import adapter_zip as zip_folder

    return zip_folder(folder, paths().artifacts)


def delete_adapter(folder: str) -> None:
    from dashboard.adapter_files import delete_adapter as delete_folder

    delete_folder(folder, paths().artifacts)


# -- data -------------------------------------------------------------------------------------------------------


def available_tasks(data_dir: Path) -> list[str]:
    """Task ids of the registry that have a folder in `data_dir`, in registry order."""
    from oppu.tasks import TASKS

    return [t for t in TASKS if (data_dir / t).is_dir()]


# cache_resource, not cache_data: TaskData is immutable (read-only mappings) and large, so share it uncopied.
@st.cache_resource(show_spinner="Loading task data…", ttl=600)
def _task_data(data_dir: str, task: str):
    from oppu.data import load_task_data

    return load_task_data(data_dir, task)


def task_data(task: str):
    return _task_data(str(paths().data), task)


# Orderings of the Data explorer's user list: keyword arguments of DataFrame.sort_values over `user_sizes`.
USER_ORDERS: dict[str, dict] = {
    "most active first": {"by": ["history_size", "user_id"], "ascending": [False, True]},
    "least active first": {"by": ["history_size", "user_id"], "ascending": [True, True]},
    "by id": {"by": ["user_id"], "ascending": [True]},
}


# -- widgets ----------------------------------------------------------------------------------------------------


def latest_task() -> str | None:
    """Task of the newest stored run, the natural default while nothing else was chosen (None when the store is
    empty or unreadable: the page's own queries report that)."""
    try:
        runs = query("latest_runs", 1)
    except Exception:  # noqa: BLE001 - only a default; the page shows the store's error where it reads it
        return None
    return None if runs.empty else str(runs["task"].iloc[0])


def task_picker(tasks: list[str], key: str, label: str = "Task") -> str | None:
    """A task selectbox starting on `?task=` from the URL, else the task chosen on another page, else the task
    of the newest run, else the first; the choice carries over to the other pages."""
    from oppu.tasks import get_task

    if not tasks:
        return None
    wanted = st.query_params.get("task")
    if wanted is not None and wanted not in tasks:
        st.warning(f"The link asks for task {wanted!r}, which is not available here ({', '.join(tasks)}).")
    candidates = (wanted, st.session_state.get("_task"), latest_task())
    index = next((tasks.index(t) for t in candidates if t in tasks), 0)
    choice = st.selectbox(label, tasks, index=index, key=key,
                          format_func=lambda t: f"{t} · {get_task(t).name.replace('_', ' ')}")
    st.session_state["_task"] = choice
    return choice


def pick(label: str, options: list, key: str, url_param: str | None = None, **kwargs):
    """A selectbox that starts on the URL's `?<url_param>=` value when it is one of the options.

    Returns (choice, unknown) where `unknown` is the URL value that matched nothing (to tell the user), or None.
    """
    wanted = st.query_params.get(url_param) if url_param else None
    unknown = wanted if wanted is not None and wanted not in options else None
    index = options.index(wanted) if wanted in options else 0
    return st.selectbox(label, options, index=index, key=key, **kwargs), unknown


def data_task_picker(key: str) -> str:
    """The task picker over the tasks with a data folder; with none, the no-data message, and the page stops."""
    tasks = available_tasks(paths().data)
    if not tasks:
        no_data_message(paths().data)
        st.stop()
    return task_picker(tasks, key=key)


def no_data_message(data_dir: Path) -> None:
    st.warning(f"No LaMP task folders found in `{data_dir}`. Point `OPPU_DATA` at a folder with one sub-folder "
               "per task (e.g. `data/demo/LaMP_2M/`), or create the demo data with `python data/generate.py`.")


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
