"""Background jobs as the Train page shows them: the job list (sweeps grouped, members labelled by their
setting), a running job's card (phase, step of total, users done, loss per user and style, time left, cancel),
a sweep's card (planned/done counts, cancel the whole sweep) and a job's outcome (its error in one line and
Retry, Resume after a stop, the states it passed through, the log tail).

The jobs themselves are `oppu.jobs`'s: this module only reads their folders under `OPPU_JOBS` and draws them.
"""

from __future__ import annotations

import math
import time

import pandas as pd
import streamlit as st

from dashboard import charts, tables
from dashboard.state import paths

ACTIVE_STATES = ("queued", "running")


def list_jobs() -> list[dict]:
    """Every job under OPPU_JOBS, newest first, as `oppu.jobs.get_job` describes it; none before the first."""
    from oppu import jobs as core

    root = paths().jobs
    if not root.exists():
        return []
    return list(core.list_jobs(str(root)))


def member_label(job: dict) -> str:
    """`k-sweep · k=4` for a sweep's member, '' for a job of its own."""
    sweep = job.get("sweep") or {}
    return f"{sweep.get('kind')} sweep · {sweep.get('label')}" if sweep.get("id") else ""


def one_line(error: str | None) -> str:
    return (error or "").strip().splitlines()[0] if (error or "").strip() else ""


def jobs_frame(job_list: list[dict]) -> pd.DataFrame:
    rows = [{"job": j["id"], "sweep": member_label(j), "state": j["state"], "task": j.get("task"),
             "stage": j.get("phase") or j.get("stage"),
             "progress": f"{j['progress']:.0%}" if j.get("progress") is not None else "",
             "users done": f"{j.get('users_done') or 0}/{j.get('users_total') or '?'}",
             "elapsed": tables.duration(j.get("elapsed_s")), "run": j.get("run_id"), "error": one_line(j.get("error"))}
            for j in job_list]
    return pd.DataFrame(rows)


def sweeps_frame(groups: list[dict]) -> pd.DataFrame:
    rows = [{"sweep": g["id"], "kind": g["kind"], "task": g["task"], "state": g["state"], "planned": g["planned"],
             "done": g["done"], "running": g["running"], "queued": g["queued"], "failed": g["failed"],
             "cancelled": g["cancelled"], "members": ", ".join(str((j.get("sweep") or {}).get("label"))
                                                               for j in g["members"])} for g in groups]
    return pd.DataFrame(rows)


def progress_text(job: dict) -> str:
    """`task adaptation (plain) · step 7 of 40 · users done 0 of 4 · elapsed 1m 05s · time left 2m 10s`."""
    parts = [str(job.get("phase") or job.get("stage") or "starting")]
    if job.get("steps_total"):
        parts.append(f"step {job.get('step') or 0} of {job['steps_total']}")
    elif job.get("step"):
        parts.append(f"step {job['step']}")
    if job.get("users_total"):
        parts.append(f"users done {job.get('users_done') or 0} of {job['users_total']}")
    parts.append(f"elapsed {tables.duration(job.get('elapsed_s'))}")
    eta = job.get("eta_s")
    parts.append(f"time left {tables.duration(eta)}" if eta is not None else "time left: measuring")
    return " · ".join(parts)


def loss_frame(job: dict) -> pd.DataFrame:
    """The job's losses with one series per user and prompt style; task adaptation is named by its style."""
    frame = pd.DataFrame(job.get("losses") or [], columns=["step", "loss", "user_id", "style", "stage"])
    return _named_series(frame)


def stored_curves_frame(curves: pd.DataFrame) -> pd.DataFrame:
    """A stored run's training curves (`Store.train_curve`: user_id, stage such as `adapt:plain` or `oppu:rag-k1`,
    step, loss) named as a job's live losses are: `task adaptation (plain)`, `alice (rag-k1)`."""
    frame = curves.reindex(columns=["step", "loss", "user_id", "stage"]).copy()
    frame["style"] = frame["stage"].astype(str).str.partition(":")[2]
    frame["stage"] = frame["stage"].astype(str).str.startswith("adapt:").map({True: "task_adaptation",
                                                                               False: "user"})
    return _named_series(frame)


def _named_series(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame.reindex(columns=["step", "loss", "user_id"])
    style = frame["style"].fillna("").astype(str)
    adapt = frame["stage"].eq("task_adaptation") | frame["user_id"].eq("__task__")
    user = frame["user_id"].fillna("").astype(str)
    frame = frame.assign(user_id=[f"task adaptation ({s or 'plain'})" if a else (f"{u} ({s})" if s else u)
                                  for a, u, s in zip(adapt, user, style)],
                         step=frame["step"].astype(int))
    return frame[["step", "loss", "user_id"]]


def loss_chart(job: dict, key: str) -> None:
    curve_chart(loss_frame(job), key)


def curve_chart(frame: pd.DataFrame, key: str) -> None:
    """Loss against integer steps, one line per series; nothing when there is no point."""
    if frame.empty:
        return
    fig = charts.loss_curve(frame)
    top = int(frame["step"].max())
    fig.update_xaxes(tickformat="d", dtick=max(1, math.ceil(top / 10)), rangemode="tozero")
    st.plotly_chart(fig, width="stretch", key=key)


def job_card(job: dict) -> None:
    """One queued or running job: phase, step of total, users done, loss curve, time left, cancel."""
    from oppu import jobs as core

    with st.container(border=True):
        head, button = st.columns([5, 1])
        label = member_label(job)
        head.markdown(f"**Job `{job['id']}`**" + (f" · **{label}**" if label else "")
                      + f" · {job.get('task', '')} · {job['state']}")
        if button.button("Cancel", key=f"cancel-{job['id']}", icon=":material/stop:"):
            core.cancel(str(paths().jobs), job["id"])
            st.session_state["train-focus"] = job["id"]
            st.toast(f"Cancelling {job['id']}: the worker stops after the current step.")
        fraction = job.get("progress")
        if fraction is None:
            total = job.get("users_total") or 0
            fraction = (job.get("users_done") or 0) / total if total else 0.0
        st.progress(min(max(float(fraction), 0.0), 1.0), text=progress_text(job))
        loss_chart(job, key=f"loss-{job['id']}")


def sweep_card(group: dict) -> None:
    """One sweep with members still queued or running: counts, each member's setting and state, cancel all."""
    from oppu import jobs as core

    with st.container(border=True):
        head, button = st.columns([5, 1])
        head.markdown(f"**Sweep `{group['kind']}`** · {group['task']} · {group['done']} of {group['planned']} runs "
                      f"done · {group['running']} running · {group['queued']} queued")
        if button.button("Cancel sweep", key=f"cancel-sweep-{group['id']}", icon=":material/stop:"):
            core.cancel_sweep(str(paths().jobs), group["id"])
            st.toast(f"Cancelling every run of sweep {group['kind']}.")
        st.caption(" · ".join(f"{(j.get('sweep') or {}).get('label')}: {j['state']}" for j in group["members"]))


def history_text(job: dict) -> str:
    return " → ".join(h["state"] for h in job.get("history") or []) or job["state"]


def job_details(job: dict) -> None:
    """A job's outcome: its error in one line and Retry when it failed, Resume when it stopped early, the
    states it went through, the loss curve (a running job's card already shows it) and the log tail."""
    from oppu import jobs as core

    root = str(paths().jobs)
    label = member_label(job)
    name = f"Job {job['id']}" + (f" ({label})" if label else "")
    if job["state"] == "failed":
        st.error(f"{name} failed: {one_line(job.get('error')) or 'no error message was recorded'}")
        if st.button("Retry", key=f"retry-{job['id']}", icon=":material/replay:"):
            core.retry(root, job["id"])
            st.toast(f"Retrying {job['id']} on the same run.")
    elif job["state"] == "interrupted":
        st.warning(f"{name} was interrupted (its worker stopped without finishing). Resume continues the same "
                   "run from its last checkpoint; users already finished are kept.")
    elif job["state"] == "cancelled":
        st.info(f"{name} was cancelled. Resume continues the same run from its last checkpoint.")
    elif job["state"] == "done":
        st.success(f"{name} finished: run `{job.get('run_id')}`. See it on **Runs** or **Compare**.")
    if job["state"] in core.RESUMABLE_STATES and st.button("Resume", key=f"resume-{job['id']}",
                                                          icon=":material/replay:"):
        core.resume(root, job["id"])
        st.toast(f"Resumed {job['id']}: it continues from its last checkpoint.")
    st.caption(f"History: {history_text(job)} · elapsed {tables.duration(job.get('elapsed_s'))}")
    if job["state"] not in ACTIVE_STATES:
        loss_chart(job, key=f"detail-loss-{job['id']}")
    with st.expander("Worker log (last lines)"):
        st.code(core.logs(root, job["id"], tail=40) or "(empty)", language=None)


def focus_on_changes(job_list: list[dict], key: str = "train-detail") -> None:
    """Point the details selector at the job whose state changed since the last poll (a cancel, a failure, a
    finish), or at a job just acted on, so the details never stay on an older job; a selection of a job that
    is gone falls back to the newest."""
    seen = st.session_state.setdefault("train-states", {})
    changed = [j["id"] for j in job_list if j["id"] in seen and seen[j["id"]] != j["state"]]
    new = [j["id"] for j in job_list if j["id"] not in seen]
    focus = st.session_state.pop("train-focus", None)
    target = focus or (changed[0] if changed else None) or (new[0] if new and seen else None)
    ids = [j["id"] for j in job_list]
    if target in ids:
        st.session_state[key] = target
    elif st.session_state.get(key) not in ids and ids:
        st.session_state[key] = ids[0]
    st.session_state["train-states"] = {j["id"]: j["state"] for j in job_list}


def submitted_banner(job_list: list[dict], key: str = "train-submitted", keep_s: float = 15.0) -> None:
    """The note of the last submission, only until its jobs are under way (or a few seconds have passed)."""
    note = st.session_state.get(key)
    if not note:
        return
    job_ids, text, at = note
    states = {j["id"]: j["state"] for j in job_list}
    waiting = any(states.get(j) in (None, "queued") for j in job_ids)
    age = time.time() - at
    if age > keep_s or (not waiting and age > 3.0):
        del st.session_state[key]
        return
    st.success(text)
