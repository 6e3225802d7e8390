"""Local job lifecycle: submit, list, show, cancel, resume and read the logs of jobs, and start their workers.

States: queued -> running -> done | failed | cancelled, and `interrupted` when a running job's worker died
(its pid is gone, or its heartbeat is older than ~10 s) or was terminated without a cancel request. A job that
is interrupted, failed or cancelled can be resumed: a new worker continues the same run_id, and the runner
(`oppu.experiment.run_experiment`) skips users already complete in the results store, so nothing is duplicated.

The worker is `python -m oppu worker JOB_ID --root ROOT`, started detached (its own session) so it outlives the
dashboard or CLI that submitted it. At most `max_workers` local workers run at once; further jobs stay queued and
the next one starts when a worker exits (or on the next submit / resume / list), so no daemon is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from oppu.jobs.folder import (
    BACKENDS,
    DEFAULT_MAX_WORKERS,
    DEFAULT_ROOT,
    JOB_ID_RE,
    RUNNER_RE,
    JobError,
    elapsed,
    end_attempt,
    job_dir,
    new_job_id,
    read_events,
    read_job,
    root_lock,
    transition,
    write_job,
)
from oppu.jobs.progress import summarize_progress

STALE_S = 10.0
"""A running job whose heartbeat is older than this is reported interrupted."""

_children: dict[int, subprocess.Popen[bytes]] = {}  # workers this process started, reaped when they exit


# -- liveness ----------------------------------------------------------------------------------------------------
def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _children.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (killed, not yet reaped by its parent) is dead
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def heartbeat_age(folder: Path, now: float | None = None) -> float | None:
    try:
        return (now or time.time()) - (folder / "heartbeat").stat().st_mtime
    except FileNotFoundError:
        return None


def runs_job(pid: int, job_id: str) -> bool | None:
    """Whether process `pid` is a worker of `job_id` (None when /proc cannot tell, e.g. not Linux)."""
    try:
        return job_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def dead_reason(job: dict[str, Any], folder: Path) -> str | None:
    """Why a job recorded as running is not running any more, or None if it still is.

    On the worker's own host the process decides: a live worker process is never declared dead for a late
    heartbeat (resuming it would start a second worker on the same run). The heartbeat decides elsewhere, and
    when the recorded pid now belongs to another process.
    """
    if job.get("state") != "running":
        return None
    age = heartbeat_age(folder)
    stale = age is not None and age > STALE_S
    if job.get("host") == socket.gethostname():
        pid = job.get("pid")
        if not pid_alive(pid):
            return f"worker process {pid} is gone"
        if stale and runs_job(pid, job["job_id"]) is False:
            return f"worker process {pid} is gone (the pid now belongs to another process)"
        return None
    return f"worker heartbeat is {age:.0f} s old" if stale else None


def reconcile(root: str | os.PathLike[str]) -> None:
    """Mark dead running jobs interrupted and start queued jobs while worker slots are free (call under lock)."""
    for pid, child in list(_children.items()):  # reap workers we started that have exited: no zombies pile up
        if child.poll() is not None:
            _children.pop(pid, None)
    jobs = []
    for folder in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        if not JOB_ID_RE.fullmatch(folder.name) or not (folder / "job.json").is_file():
            continue
        with contextlib.suppress(json.JSONDecodeError, FileNotFoundError):
            jobs.append(json.loads((folder / "job.json").read_text()))
    running = 0
    for job in jobs:
        folder = job_dir(root, job["job_id"])
        reason = dead_reason(job, folder)
        if reason is not None:
            now = time.time()
            beat = heartbeat_age(folder, now)
            # the worker died at its last heartbeat, not when we noticed
            end_attempt(job, now - beat if beat is not None else now)
            transition(job, "interrupted", finished=now, error=f"interrupted: {reason}")
            write_job(folder / "job.json", job)
        elif job.get("state") == "running":
            running += 1
    for job in sorted((j for j in jobs if j.get("state") == "queued"), key=lambda j: j.get("created", 0)):
        if running >= int(job.get("max_workers") or DEFAULT_MAX_WORKERS):
            break
        _spawn(root, job)
        running += 1


def _spawn(root: str | os.PathLike[str], job: dict[str, Any]) -> None:
    """Start the worker process of a queued job and record it as running (call under the root lock)."""
    folder = job_dir(root, job["job_id"])
    (folder / "heartbeat").touch()  # the worker's own heartbeat thread takes over within a second
    with open(folder / "worker.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oppu", "worker", job["job_id"], "--root", str(Path(root).resolve())],
            cwd=job.get("cwd") or os.getcwd(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**_quiet_env(), **os.environ},
            start_new_session=True)  # survives the dashboard/CLI exiting; its own process group for SIGTERM
    _children[proc.pid] = proc
    transition(job, "running", pid=proc.pid, host=socket.gethostname(), started=time.time(), finished=None)
    write_job(folder / "job.json", job)


def _quiet_env() -> dict[str, str]:
    from oppu.jobs.worker import QUIET_ENV

    return dict(QUIET_ENV)


# -- public API --------------------------------------------------------------------------------------------------
def submit(cfg: Any, jobs_root: str | os.PathLike[str] = DEFAULT_ROOT, backend: str = "local", start: bool = True,
           *, address: str | None = None, shares: int | None = None, max_workers: int | None = None,
           runner: str | None = None, check_data: bool = True, sweep: dict[str, Any] | None = None) -> str:
    """Queue a run of `cfg` (a `RunConfig`) and, when `start`, start its worker if a slot is free. Returns at once
    with the job id, which is also the run id in the results store.

    backend: `local` (one worker process) or `ray` (users split into `shares` Ray tasks; `address` of an existing
    cluster, else a local one). runner: `module:function` called like `run_experiment` (default the real one).
    check_data: read the task data and resolve the users now, so an unusable data folder or an unknown user id
    is refused here (DataError, UnknownUserError) instead of failing later in the worker; nothing is written
    before that check passes. The resolved ids are kept in job.json (`users`). The model is checked too
    (`oppu.model.check_model`): an unknown id or a missing folder is refused here with a short message.
    sweep: the sweep this job belongs to (`oppu.jobs.sweeps.submit_sweep` sets it).
    """
    if backend not in BACKENDS:
        raise JobError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if runner is not None and not RUNNER_RE.fullmatch(runner):
        raise JobError(f"runner {runner!r}: give it as module.path:function")
    if shares is not None and shares < 1:
        raise JobError(f"shares must be >= 1 (got {shares})")
    if max_workers is not None and max_workers < 1:
        raise JobError(f"max_workers must be >= 1 (got {max_workers})")
    users = resolve_users(cfg) if check_data else None
    if check_data:
        from oppu.model import check_model

        check_model(cfg.model)
    job_id = new_job_id()
    folder = job_dir(jobs_root, job_id)
    folder.mkdir(parents=True, exist_ok=False)
    job = {"job_id": job_id, "run_id": job_id, "config": cfg.to_dict(), "users": users, "backend": backend,
           "address": address,
           "shares": shares, "runner": runner, "max_workers": max_workers or DEFAULT_MAX_WORKERS,
           "cwd": os.getcwd(), "state": "queued", "created": time.time(), "started": None, "finished": None,
           "pid": None, "host": None, "error": None, "traceback": None, "attempts": 0, "elapsed_before": 0.0,
           "history": [{"state": "queued", "t": time.time()}], "sweep": sweep}
    with root_lock(jobs_root):
        write_job(folder / "job.json", job)
        if start:
            reconcile(jobs_root)
    return job_id


def list_jobs(root: str | os.PathLike[str] = DEFAULT_ROOT) -> list[dict[str, Any]]:
    """Every job, newest first, with derived progress fields (see `get_job`). Also marks dead workers'
    jobs interrupted and starts queued jobs for which a slot has freed."""
    if not Path(root).is_dir():
        return []
    with root_lock(root):
        reconcile(root)
    ids = [f.name for f in Path(root).iterdir() if JOB_ID_RE.fullmatch(f.name) and (f / "job.json").is_file()]
    return sorted((get_job(root, i) for i in ids), key=lambda j: j.get("created", 0), reverse=True)


def get_job(root: str | os.PathLike[str], job_id: str) -> dict[str, Any]:
    """job.json plus derived fields: id (= job_id), task, stage, user, user_index (1-based: the user being
    worked on, "user i of N"), users_done, users_total, step, steps_total, loss, losses (list of
    {step, loss, user_id}), loss_history (floats), progress (0..1 or None), elapsed_s, eta_s (None until it can
    be estimated), heartbeat_age_s. A running job whose worker is dead is reported (and recorded) as
    interrupted."""
    folder = job_dir(root, job_id)
    job = read_job(root, job_id)
    if dead_reason(job, folder) is not None:
        with root_lock(root):
            reconcile(root)
        job = read_job(root, job_id)
    now = time.time()
    job.update(summarize_progress(read_events(folder), now))
    job["id"] = job["job_id"]
    job["task"] = (job.get("config") or {}).get("task")
    job["elapsed_s"] = elapsed(job, now)
    job["heartbeat_age_s"] = heartbeat_age(folder, now)
    if job.get("state") != "running":
        job["eta_s"] = None
    return job


def cancel(root: str | os.PathLike[str], job_id: str, wait_s: float = 0.0) -> str:
    """Ask a job to stop; returns its state afterwards. A queued job is cancelled at once. A running worker sees
    the cancel flag within ~2 s, lets the runner stop at its next check, and interrupts it after a few seconds
    otherwise; users already finished stay stored. With `wait_s` > 0 this waits that long for the worker to stop
    and then sends SIGTERM to its process group (for a worker that is stuck)."""
    folder = job_dir(root, job_id)
    with root_lock(root):
        job = read_job(root, job_id)
        if job["state"] == "queued":
            transition(job, "cancelled", finished=time.time())
            write_job(folder / "job.json", job)
            return "cancelled"
        if job["state"] != "running":
            return job["state"]
        (folder / "cancel").write_text(str(time.time()))
    deadline = time.monotonic() + wait_s
    while wait_s > 0 and time.monotonic() < deadline:
        state = get_job(root, job_id)["state"]
        if state != "running":
            return state
        time.sleep(0.2)
    if wait_s > 0:
        pid = read_job(root, job_id).get("pid")
        with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
            os.killpg(pid, signal.SIGTERM)
    return get_job(root, job_id)["state"]


def resume(root: str | os.PathLike[str], job_id: str) -> str:
    """Queue an interrupted or cancelled job again on the same run id and start it if a slot is free. The
    runner skips users already complete in the store and training continues from its last checkpoint. A failed
    job is retried instead (`retry`). Returns the job id."""
    return _requeue(root, job_id, ("interrupted", "cancelled"), "resumed")


def retry(root: str | os.PathLike[str], job_id: str) -> str:
    """Queue a failed job again on the same run id (what it finished and its checkpoints are kept), e.g. after
    fixing what its error names. Returns the job id."""
    return _requeue(root, job_id, ("failed",), "retried")


def _requeue(root: str | os.PathLike[str], job_id: str, allowed: tuple[str, ...], passed: str) -> str:
    folder = job_dir(root, job_id)
    get_job(root, job_id)  # records a dead worker as interrupted first
    with root_lock(root):
        job = read_job(root, job_id)
        if job["state"] not in allowed:
            hint = {"failed": f"a failed job is retried: `oppu jobs retry {job_id}`"}.get(
                job["state"], f"only {' or '.join(allowed)} jobs can be {passed}")
            raise JobError(f"job {job_id} is {job['state']}: {hint}")
        with contextlib.suppress(FileNotFoundError):
            (folder / "cancel").unlink()
        transition(job, "queued", passed=passed, error=None, traceback=None, started=None, finished=None,
                   pid=None)
        write_job(folder / "job.json", job)
        reconcile(root)
    return job_id


def logs(root: str | os.PathLike[str], job_id: str, tail: int | None = None) -> str:
    """The worker's log (stdout and stderr of every attempt); only its last `tail` lines when given."""
    try:
        text = (job_dir(root, job_id) / "worker.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-tail:]) if tail else text
    except FileNotFoundError:
        read_job(root, job_id)  # an unknown job gets the clearer error
        return ""


def resolve_users(cfg: Any) -> list[str]:
    """The ids of the test users `cfg` selects, read from its data folder (no model is loaded), chosen exactly as
    the run will choose them (`oppu.experiment.select_users`; an unknown id raises UnknownUserError)."""
    from oppu.experiment import select_users
    from oppu.splits import run_data

    return [user.id for user in select_users(run_data(cfg), cfg)]
