"""Training jobs: submit a run to a background worker process, watch its progress, cancel it, resume it.

A job is one resolved `RunConfig` plus the way to run it, kept in a folder `<root>/<job_id>/`:

    job.json        config, state, times, error + traceback, backend (written atomically: temp file + os.replace)
    progress.jsonl  one JSON event per line, appended by the runner's progress callback
    heartbeat       its mtime is touched every ~2 s by a thread of the worker
    cancel          present once cancellation was asked for
    worker.log      the worker's stdout and stderr

States: queued -> running -> done | failed | cancelled, and `interrupted` when a running job's worker died
(its pid is gone, or its heartbeat is older than ~10 s) or was terminated without a cancel request. A job that
is interrupted, failed or cancelled can be resumed: a new worker continues the same run_id, and the runner
(`oppu.experiment.run_experiment`) skips users already complete in the results store, so nothing is duplicated.

The worker is `python -m oppu worker JOB_ID --root ROOT`, started detached (its own session) so it outlives the
dashboard or CLI that submitted it. At most `max_workers` local workers run at once; further jobs stay queued and
the next one starts when a worker exits (or on the next submit / resume / list), so no daemon is needed.

Ray backend (`backend="ray"`): the worker splits the job's users into shares and runs each share as one Ray task,
which loads the base model once and calls the runner on its share with the same run_id. Every share writes to the
same results store file and the same job folder, so on a multi-node cluster the store path, the artifacts
folder and the jobs root must be on a filesystem shared by all nodes (NFS or similar); a crashed or killed Ray
task is reported as a failed job, never a hang.
"""

from __future__ import annotations

import _thread
import contextlib
import importlib
import inspect
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from oppu.paths import file_lock, write_json_atomic

STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
RESUMABLE_STATES = frozenset({"interrupted", "failed", "cancelled"})
BACKENDS = ("local", "ray")
DEFAULT_ROOT = "runs/jobs"
DEFAULT_RUNNER = "oppu.experiment:run_experiment"
HEARTBEAT_S = 2.0
"""How often the worker touches its heartbeat file."""
STALE_S = 10.0
"""A running job whose heartbeat is older than this is reported interrupted."""
CANCEL_GRACE_S = 3.0
"""After a cancel request, how long the worker lets the runner stop on its own before interrupting it."""
DEFAULT_MAX_WORKERS = int(os.environ.get("OPPU_MAX_WORKERS", "1"))
"""Local workers at once; one training job already uses every core of a small machine."""

_JOB_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
_RUNNER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_LOSS_HISTORY = 500
_children: dict[int, subprocess.Popen[bytes]] = {}  # workers this process started, reaped when they exit

Runner = Callable[..., Any]


class JobError(RuntimeError):
    """A job cannot be found, started, cancelled or resumed; the message says why and what to do."""


class _Stopped(BaseException):
    """Raised in the worker's main thread by SIGTERM or a cancel that the runner did not honour in time."""


# -- ids and files -----------------------------------------------------------------------------------------------
def new_job_id() -> str:
    """A fresh job id: UTC time plus 6 random hex digits (sortable, safe as a folder name)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_job_id(job_id: str) -> str:
    """Return `job_id` when it has our format; anything else (paths, `..`, odd characters) is refused."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise JobError(f"invalid job id {job_id!r}: job ids look like 20250101-120000-a1b2c3 "
                       "(see `oppu jobs list`)")
    return job_id


def job_dir(root: str | os.PathLike[str], job_id: str) -> Path:
    return Path(root) / check_job_id(job_id)


def _write_job(path: Path, job: dict[str, Any]) -> None:
    write_json_atomic(path, job, default=str)


def _read_job(root: str | os.PathLike[str], job_id: str) -> dict[str, Any]:
    path = job_dir(root, job_id) / "job.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise JobError(f"no job {job_id} under {root}: list jobs with `oppu jobs list --root {root}`") from None


@contextlib.contextmanager
def _root_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """Serialises state changes and slot accounting between the CLI, the dashboard and workers."""
    with file_lock(Path(root) / ".lock"):
        yield


def _append_event(folder: Path, event: dict[str, Any]) -> None:
    line = json.dumps({"t": time.time(), **event}, default=str) + "\n"
    # one write() of a short line to an O_APPEND file: lines from several processes (Ray shares) never interleave
    fd = os.open(folder / "progress.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _events(folder: Path) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(FileNotFoundError):
        for line in (folder / "progress.jsonl").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash mid-write
                events.append(json.loads(line))
    return events


# -- liveness ----------------------------------------------------------------------------------------------------
def _pid_alive(pid: int | None) -> bool:
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


def _heartbeat_age(folder: Path, now: float | None = None) -> float | None:
    try:
        return (now or time.time()) - (folder / "heartbeat").stat().st_mtime
    except FileNotFoundError:
        return None


def _runs_job(pid: int, job_id: str) -> bool | None:
    """Whether process `pid` is a worker of `job_id` (None when /proc cannot tell, e.g. not Linux)."""
    try:
        return job_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _dead_reason(job: dict[str, Any], folder: Path) -> str | None:
    """Why a job recorded as running is not running any more, or None if it still is.

    On the worker's own host the process decides: a live worker process is never declared dead for a late
    heartbeat (resuming it would start a second worker on the same run). The heartbeat decides elsewhere, and
    when the recorded pid now belongs to another process.
    """
    if job.get("state") != "running":
        return None
    age = _heartbeat_age(folder)
    stale = age is not None and age > STALE_S
    if job.get("host") == socket.gethostname():
        pid = job.get("pid")
        if not _pid_alive(pid):
            return f"worker process {pid} is gone"
        if stale and _runs_job(pid, job["job_id"]) is False:
            return f"worker process {pid} is gone (the pid now belongs to another process)"
        return None
    return f"worker heartbeat is {age:.0f} s old" if stale else None


def _reconcile(root: str | os.PathLike[str]) -> None:
    """Mark dead running jobs interrupted and start queued jobs while worker slots are free (call under lock)."""
    for pid, child in list(_children.items()):  # reap workers we started that have exited: no zombies pile up
        if child.poll() is not None:
            _children.pop(pid, None)
    jobs = []
    for folder in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        if not _JOB_ID.fullmatch(folder.name) or not (folder / "job.json").is_file():
            continue
        with contextlib.suppress(json.JSONDecodeError, FileNotFoundError):
            jobs.append(json.loads((folder / "job.json").read_text()))
    running = 0
    for job in jobs:
        folder = job_dir(root, job["job_id"])
        reason = _dead_reason(job, folder)
        if reason is not None:
            job.update(state="interrupted", finished=time.time(), error=f"interrupted: {reason}")
            _write_job(folder / "job.json", job)
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
            start_new_session=True)  # survives the dashboard/CLI exiting; its own process group for SIGTERM
    _children[proc.pid] = proc
    job.update(state="running", pid=proc.pid, host=socket.gethostname(), started=time.time(), finished=None)
    _write_job(folder / "job.json", job)


# -- public API --------------------------------------------------------------------------------------------------
def submit(cfg: Any, jobs_root: str | os.PathLike[str] = DEFAULT_ROOT, backend: str = "local", start: bool = True,
           *, address: str | None = None, shares: int | None = None, max_workers: int | None = None,
           runner: str | None = None, check_data: bool = True) -> str:
    """Queue a run of `cfg` (a `RunConfig`) and, when `start`, start its worker if a slot is free. Returns at once
    with the job id, which is also the run id in the results store.

    backend: `local` (one worker process) or `ray` (users split into `shares` Ray tasks; `address` of an existing
    cluster, else a local one). runner: `module:function` called like `run_experiment` (default the real one).
    check_data: read the task data and resolve the users now, so an unusable data folder or an unknown user id
    is refused here (DataError, UnknownUserError) instead of failing later in the worker; nothing is written
    before that check passes. The resolved ids are kept in job.json (`users`).
    """
    if backend not in BACKENDS:
        raise JobError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if runner is not None and not _RUNNER.fullmatch(runner):
        raise JobError(f"runner {runner!r}: give it as module.path:function")
    if shares is not None and shares < 1:
        raise JobError(f"shares must be >= 1 (got {shares})")
    if max_workers is not None and max_workers < 1:
        raise JobError(f"max_workers must be >= 1 (got {max_workers})")
    users = resolve_users(cfg) if check_data else None
    job_id = new_job_id()
    folder = job_dir(jobs_root, job_id)
    folder.mkdir(parents=True, exist_ok=False)
    job = {"job_id": job_id, "run_id": job_id, "config": cfg.to_dict(), "users": users, "backend": backend,
           "address": address,
           "shares": shares, "runner": runner, "max_workers": max_workers or DEFAULT_MAX_WORKERS,
           "cwd": os.getcwd(), "state": "queued", "created": time.time(), "started": None, "finished": None,
           "pid": None, "host": None, "error": None, "traceback": None, "attempts": 0}
    with _root_lock(jobs_root):
        _write_job(folder / "job.json", job)
        if start:
            _reconcile(jobs_root)
    return job_id


def list_jobs(root: str | os.PathLike[str] = DEFAULT_ROOT) -> list[dict[str, Any]]:
    """Every job, newest first, with derived progress fields (see `get_job`). Also marks dead workers'
    jobs interrupted and starts queued jobs for which a slot has freed."""
    if not Path(root).is_dir():
        return []
    with _root_lock(root):
        _reconcile(root)
    ids = [f.name for f in Path(root).iterdir() if _JOB_ID.fullmatch(f.name) and (f / "job.json").is_file()]
    return sorted((get_job(root, i) for i in ids), key=lambda j: j.get("created", 0), reverse=True)


def get_job(root: str | os.PathLike[str], job_id: str) -> dict[str, Any]:
    """job.json plus derived fields: id (= job_id), task, stage, user, user_index (1-based: the user being
    worked on, "user i of N"), users_done, users_total, step, steps_total, loss, losses (list of
    {step, loss, user_id}), loss_history (floats), progress (0..1 or None), elapsed_s, eta_s (None until it can
    be estimated), heartbeat_age_s. A running job whose worker is dead is reported (and recorded) as
    interrupted."""
    folder = job_dir(root, job_id)
    job = _read_job(root, job_id)
    if _dead_reason(job, folder) is not None:
        with _root_lock(root):
            _reconcile(root)
        job = _read_job(root, job_id)
    now = time.time()
    job.update(summarize_progress(_events(folder), now))
    job["id"] = job["job_id"]
    job["task"] = (job.get("config") or {}).get("task")
    end = job.get("finished") if job.get("state") != "running" else None
    job["elapsed_s"] = (end or now) - job["started"] if job.get("started") else None
    job["heartbeat_age_s"] = _heartbeat_age(folder, now)
    if job.get("state") != "running":
        job["eta_s"] = None
    return job


def progress_event(*args: Any) -> dict[str, Any]:
    """One runner progress report -> a JSON event. Accepts a dict event, or `run_experiment`'s positional
    `(stage, step, total, loss)` where stage is `adapt:<task>`, `user:<user id>:<style>` or `users`."""
    if len(args) == 1 and isinstance(args[0], dict):
        return dict(args[0])
    if len(args) != 4:
        raise JobError(f"progress: expected a dict or (stage, step, total, loss), got {len(args)} arguments")
    stage, step, total, loss = args
    stage = str(stage)
    if stage == "users":
        return {"stage": "users", "users_done": step, "users_total": total}
    event: dict[str, Any] = {"stage": stage, "step": step, "steps_total": total, "loss": loss}
    if stage.startswith("adapt:"):
        event.update(stage="task_adaptation", user="__task__")
    elif stage.startswith("user:"):
        user, _, style = stage[len("user:"):].rpartition(":")
        event.update(stage="train_user", user=user or style, style=style if user else "")
    return event


def summarize_progress(events: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """Derive the job's position from its progress events (pure: tested without a worker).

    Only the latest attempt counts (events after the last `started`/`resumed`). Users are counted as done from
    the runner's `users` reports and, between them, from the users whose training began; Ray shares (events
    carrying `share`) are added up. The ETA extrapolates the per-user rate since the first user's training.
    """
    out: dict[str, Any] = {"stage": None, "user": None, "user_index": None, "users_done": None,
                           "users_total": None, "step": None, "steps_total": None, "loss": None, "losses": [],
                           "loss_history": [], "progress": None, "eta_s": None}
    start = max((i for i, e in enumerate(events) if e.get("stage") in ("started", "resumed")), default=-1)
    before = int(events[start].get("users_done_before") or 0) if start >= 0 else 0
    total = events[start].get("users_total") if start >= 0 else None
    events = events[start + 1:]
    trained: dict[Any, list[str]] = {}
    done: dict[Any, int] = {}
    within: dict[Any, float] = {}
    first_train_t = None
    for e in events:
        share = e.get("share")
        if e.get("users_total"):
            total = e["users_total"] if share is None or e.get("stage") == "ray" else total
        if e.get("stage") == "users":
            done[share] = int(e.get("users_done") or 0)
            within[share] = 0.0
        elif e.get("stage") == "train_user":
            first_train_t = first_train_t if first_train_t is not None else e.get("t")
            users = trained.setdefault(share, [])
            if e.get("user") not in users:
                users.append(e.get("user"))
            steps = e.get("steps_total")
            within[share] = min(float(e.get("step") or 0) / steps, 1.0) if steps else 0.0
        if isinstance(e.get("loss"), (int, float)):
            out["losses"].append({"step": e.get("step"), "loss": float(e["loss"]), "user_id": e.get("user")})
        for key in ("stage", "user", "step", "steps_total"):
            if key in e:
                out[key] = e[key]
    out["losses"] = out["losses"][-_LOSS_HISTORY:]
    out["loss_history"] = [p["loss"] for p in out["losses"]]
    out["loss"] = out["loss_history"][-1] if out["loss_history"] else None
    if total:
        in_progress = sum(max(len(u) - 1 + within.get(s, 0.0), 0.0) for s, u in trained.items())
        current = min(max(before + in_progress, float(sum(done.values()))), float(total))
        if out["stage"] == "done":
            current = float(total)
        out.update(users_total=int(total), users_done=int(current), progress=current / total,
                   user_index=min(int(current) + 1, int(total)))
        if first_train_t is not None and current > before and current < total:
            out["eta_s"] = (now - first_train_t) * (total - current) / (current - before)
    return out


def cancel(root: str | os.PathLike[str], job_id: str, wait_s: float = 0.0) -> str:
    """Ask a job to stop; returns its state afterwards. A queued job is cancelled at once. A running worker sees
    the cancel flag within ~2 s, lets the runner stop at its next check, and interrupts it after a few seconds
    otherwise; users already finished stay stored. With `wait_s` > 0 this waits that long for the worker to stop
    and then sends SIGTERM to its process group (for a worker that is stuck)."""
    folder = job_dir(root, job_id)
    with _root_lock(root):
        job = _read_job(root, job_id)
        if job["state"] == "queued":
            job.update(state="cancelled", finished=time.time())
            _write_job(folder / "job.json", job)
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
        pid = _read_job(root, job_id).get("pid")
        with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
            os.killpg(pid, signal.SIGTERM)
    return get_job(root, job_id)["state"]


def resume(root: str | os.PathLike[str], job_id: str) -> str:
    """Queue an interrupted, failed or cancelled job again on the same run id and start it if a slot is free.
    The runner skips users already complete in the store. Returns the job id."""
    folder = job_dir(root, job_id)
    get_job(root, job_id)  # records a dead worker as interrupted first
    with _root_lock(root):
        job = _read_job(root, job_id)
        if job["state"] not in RESUMABLE_STATES:
            raise JobError(f"job {job_id} is {job['state']}: only interrupted, failed or cancelled jobs resume")
        with contextlib.suppress(FileNotFoundError):
            (folder / "cancel").unlink()
        job.update(state="queued", error=None, traceback=None, started=None, finished=None, pid=None)
        _write_job(folder / "job.json", job)
        _reconcile(root)
    return job_id


def logs(root: str | os.PathLike[str], job_id: str, tail: int | None = None) -> str:
    """The worker's log (stdout and stderr of every attempt); only its last `tail` lines when given."""
    try:
        text = (job_dir(root, job_id) / "worker.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-tail:]) if tail else text
    except FileNotFoundError:
        _read_job(root, job_id)  # an unknown job gets the clearer error
        return ""


# -- the worker --------------------------------------------------------------------------------------------------
def resolve_runner(spec: str | None) -> Runner:
    """`module:function` -> the function (default: `oppu.experiment.run_experiment`)."""
    spec = spec or DEFAULT_RUNNER
    if not _RUNNER.fullmatch(spec):
        raise JobError(f"runner {spec!r}: give it as module.path:function")
    module, name = spec.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise JobError(f"cannot load runner {spec}: {err}") from err


class _Heartbeat(threading.Thread):
    """Touches the heartbeat file; when a cancel was asked and the runner ignores it, interrupts the main thread."""

    def __init__(self, folder: Path) -> None:
        super().__init__(name="oppu-heartbeat", daemon=True)
        self.folder = folder
        self.stopped = threading.Event()

    def run(self) -> None:
        interrupted = False
        while not self.stopped.wait(min(HEARTBEAT_S, 1.0)):
            with contextlib.suppress(OSError):
                (self.folder / "heartbeat").touch()
            try:
                asked = float((self.folder / "cancel").read_text() or 0)
            except (OSError, ValueError):
                continue
            if not interrupted and time.time() - asked > CANCEL_GRACE_S:
                interrupted = True
                _thread.interrupt_main(signal.SIGTERM)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Stopped(f"signal {signum}")


def run_worker(root: str | os.PathLike[str], job_id: str, runner: Runner | None = None) -> int:
    """Run one job in this process (what `oppu worker` executes). Returns the exit code (0 done, 1 failed,
    2 refused, 3 cancelled or interrupted). `runner` overrides the job's runner (tests)."""
    from oppu.config import RunConfig

    folder = job_dir(root, job_id)
    with _root_lock(root):
        job = _read_job(root, job_id)
        other = job.get("pid")
        if job["state"] == "running" and other not in (None, os.getpid()) and _pid_alive(other):
            print(f"job {job_id} already has a live worker (pid {other}); not starting another", file=sys.stderr)
            return 2
        if job["state"] not in ("queued", "running"):
            print(f"job {job_id} is {job['state']}: resume it with `oppu jobs resume {job_id}`", file=sys.stderr)
            return 2
        job.update(state="running", pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                   finished=None, attempts=int(job.get("attempts") or 0) + 1)
        _write_job(folder / "job.json", job)
    beat = _Heartbeat(folder)
    beat.start()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    final: dict[str, Any] = {}
    store = None
    try:
        cfg = RunConfig.from_dict(job["config"])
        run = runner or resolve_runner(job.get("runner"))
        store = _open_store(cfg, job)
        _append_event(folder, {"stage": "started" if job["attempts"] == 1 else "resumed", "attempt": job["attempts"],
                               "users_total": len(cfg.user_ids) if cfg.user_ids else cfg.users,
                               "users_done_before": len(store.done_users(job["run_id"]))})
        if job["backend"] == "ray":
            run_ray_job(job, cfg, folder, store)
        else:
            run(cfg, progress=_progress_writer(folder), should_stop=_cancel_flag(folder), store=store,
                run_id=job["run_id"], job_id=job["job_id"])
        if (folder / "cancel").exists():
            final = {"state": "cancelled"}
        else:
            final = {"state": "done"}
            _append_event(folder, {"stage": "done"})
    except (_Stopped, KeyboardInterrupt) as err:
        asked = (folder / "cancel").exists()
        final = {"state": "cancelled" if asked else "interrupted",
                 "error": None if asked else f"interrupted: worker stopped by {err or 'an interrupt'}"}
    except BaseException as err:  # noqa: BLE001 - every failure must land in job.json, then the worker exits
        final = {"state": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        print(final["traceback"], file=sys.stderr)
    finally:
        beat.stopped.set()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if store is not None and final.get("state") != "done":
            with contextlib.suppress(Exception):
                store.set_status(job["run_id"], final.get("state", "failed"))
        with _root_lock(root):
            job = _read_job(root, job_id)
            job.update(final, finished=time.time())
            _write_job(folder / "job.json", job)
            _reconcile(root)  # a slot is free: start the next queued job
    print(f"job {job_id}: {final.get('state')}" + (f" ({final['error']})" if final.get("error") else ""),
          file=sys.stderr)
    return {"done": 0, "failed": 1}.get(final.get("state", "failed"), 3)


def _progress_writer(folder: Path, **extra: Any) -> Callable[..., None]:
    def progress(*args: Any) -> None:
        _append_event(folder, {**progress_event(*args), **extra})

    return progress


def _cancel_flag(folder: Path) -> Callable[[], bool]:
    return lambda: (folder / "cancel").exists()


def _open_store(cfg: Any, job: dict[str, Any]) -> Any:
    """Create the run up front so the store links it to this job (the runner fills in what it learns later)."""
    import oppu
    from oppu.experiment import portable_config
    from oppu.model import model_key
    from oppu.store import Store

    store = Store(cfg.db)
    # Same portable form as run_experiment stores: no absolute (home) paths in the runs table.
    store.create_run(job["run_id"], portable_config(cfg), task=cfg.task, model=model_key(cfg.model), data_fingerprint="",
                     code_version=oppu.__version__, tag=cfg.tag, job_id=job["job_id"])
    return store


# -- Ray backend -------------------------------------------------------------------------------------------------
def split_users(user_ids: list[str], shares: int) -> list[list[str]]:
    """Contiguous, nearly equal shares, none empty (most active users are spread over the first shares)."""
    shares = max(1, min(shares, len(user_ids)))
    size, extra = divmod(len(user_ids), shares)
    out, start = [], 0
    for i in range(shares):
        end = start + size + (1 if i < extra else 0)
        out.append(user_ids[start:end])
        start = end
    return out


def resolve_users(cfg: Any) -> list[str]:
    """The test users `cfg` selects, read from its data folder (no model is loaded): `user_ids` in their order
    (an unknown id raises UnknownUserError naming close ones), else the `users` most active."""
    from oppu.data import load_task_data

    data = load_task_data(cfg.data_dir, cfg.task)
    if cfg.user_ids is not None:
        return [data.user(uid).id for uid in cfg.user_ids]
    return [u.id for u in data.most_active(cfg.users)]


def _ray_share(runner_spec: str | None, config: dict[str, Any], run_id: str, folder: str, share: int) -> str:
    """One Ray task: run the runner (one base-model load) on a share of the users, same run id and store."""
    from oppu.config import RunConfig

    path = Path(folder)
    cfg = RunConfig.from_dict(config)
    run = resolve_runner(runner_spec)
    # A share must not mark the shared run done: run_ray_job does that once, after the last share.
    extra = {"finalize": False} if "finalize" in inspect.signature(run).parameters else {}
    return run(cfg, progress=_progress_writer(path, share=share), should_stop=_cancel_flag(path), store=None,
               run_id=run_id, job_id=path.name, **extra)


def run_ray_job(job: dict[str, Any], cfg: Any, folder: Path, store: Any, poll_s: float = 1.0) -> None:
    """Run a job's users as Ray tasks and record the run metrics over all shares. Uses the running Ray
    session, or starts/joins one at `job['address']`. Raises JobError when a share fails or is killed."""
    import ray

    if not ray.is_initialized():
        ray.init(address=job.get("address") or None, include_dashboard=False, ignore_reinit_error=True)
    users = job.get("users") or resolve_users(cfg)
    n = job.get("shares") or max(1, int(ray.available_resources().get("CPU", 1)))
    parts = split_users(users, n)
    remote = ray.remote(num_cpus=1, max_retries=0)(_ray_share)
    refs = {remote.remote(job.get("runner"), cfg.replace(user_ids=tuple(part)).to_dict(), job["run_id"],
                          str(folder), i): i for i, part in enumerate(parts)}
    _append_event(folder, {"stage": "ray", "shares": len(parts), "users_total": len(users)})
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
            for ref in ready:
                try:
                    ray.get(ref, timeout=poll_s)
                except Exception as err:
                    raise JobError(f"Ray share {refs[ref]} of {len(parts)} failed: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}") from err
            if (folder / "cancel").exists() and pending:
                # shares see the flag themselves; give them the same grace as a local worker, then force
                deadline = time.monotonic() + CANCEL_GRACE_S
                while pending and time.monotonic() < deadline:
                    _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                break
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
    if (folder / "cancel").exists():
        return
    store.finish_run(job["run_id"], store.compute_run_metrics(job["run_id"]), status="done")

