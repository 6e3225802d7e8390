"""Background jobs as the Train page shows them: the job list, the history table, a running job's card (stage,
user i of N, loss curve, time left, cancel) and a finished job's outcome (error, resume, log tail).

The jobs themselves are `oppu.jobs`'s: this module only reads their folders under `OPPU_JOBS` and draws them.
"""

from __future__ import annotations

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
