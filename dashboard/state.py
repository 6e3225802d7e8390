"""What the dashboard reads: its folders (from env vars), the base model new jobs use, cached store queries and
cached task data.

Paths come from `OPPU_DATA`, `OPPU_DB`, `OPPU_JOBS` and `OPPU_ARTIFACTS` so tests (and users) can point the app
at other folders. Queries are cached for a few seconds only: training workers write the store while the dashboard
reads it. Nothing here draws on the page.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import charts, tables

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


def default_model() -> str:
    """The base model new jobs use: `OPPU_MODEL` when set (tests point it at a tiny model), else the config's."""
    from oppu.config import RunConfig

    return os.environ.get("OPPU_MODEL", RunConfig().model.name)


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


def latest_task() -> str | None:
    """Task of the newest stored run, the natural default while nothing else was chosen (None when the store is
    empty or unreadable: the page's own queries report that)."""
    try:
        runs = query("latest_runs", 1)
    except Exception:  # noqa: BLE001 - only a default; the page shows the store's error where it reads it
        return None
    return None if runs.empty else str(runs["task"].iloc[0])


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


def disagreeing(run_id: str, user_id: str, scoring: str = "official") -> set[str]:
    """Query ids where the stored methods give different answers under `scoring` (computed in DuckDB)."""
    frame = query("methods_disagree", run_id, user_id, scoring)
    return set() if frame.empty else set(frame["query_id"].astype(str))


def method_summary(preds: pd.DataFrame, task: str, scoring: str = "official") -> list[tuple[str, str, str]]:
    """(method, mean per-row score under `scoring` as text, what the score is) per method, in the dashboard's
    method order."""
    from oppu.metrics import row_score_name

    name, lower = row_score_name(task, scoring)
    means = preds.groupby("method")[tables.SCORED_COLUMNS[scoring][1]].mean()
    counts = preds["method"].value_counts()
    direction = "lower" if lower else "higher"
    return [(m, "–" if pd.isna(means[m]) else f"{means[m]:.2f}",
             f"mean {name} over this user's {counts[m]} queries ({direction} is better)")
            for m in charts.sort_methods(means.index)]


# -- task data --------------------------------------------------------------------------------------------------


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
