"""One job's folder and what is in it: ids, `job.json`, the progress event log, the root lock.

A job is one resolved `RunConfig` plus the way to run it, kept in a folder `<root>/<job_id>/`:

    job.json        config, state, times, error + traceback, backend (written atomically: temp file + os.replace)
    progress.jsonl  one JSON event per line, appended by the runner's progress callback
    heartbeat       its mtime is touched every ~2 s by a thread of the worker
    cancel          present once cancellation was asked for
    worker.log      the worker's stdout and stderr

Everything here is file handling; the states a job moves through are `oppu.jobs.lifecycle`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oppu.errors import OppuError
from oppu.paths import file_lock, write_json_atomic

STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
RESUMABLE_STATES = frozenset({"interrupted", "cancelled"})
"""States Resume continues from; a failed job is retried (`oppu.jobs.retry`) instead."""
RETRY_STATES = frozenset({"failed"})
BACKENDS = ("local", "ray")
DEFAULT_ROOT = "runs/jobs"
DEFAULT_RUNNER = "oppu.experiment:run_experiment"
DEFAULT_MAX_WORKERS = int(os.environ.get("OPPU_MAX_WORKERS", "1"))
"""Local workers at once; one training job already uses every core of a small machine."""

JOB_ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
RUNNER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
"""A job's `runner`: `module.path:function`."""


class JobError(OppuError, RuntimeError):
    """A job cannot be found, started, cancelled or resumed; the message says why and what to do."""


def new_job_id() -> str:
    """A fresh job id: UTC time plus 6 random hex digits (sortable, safe as a folder name)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_job_id(job_id: str) -> str:
    """Return `job_id` when it has our format; anything else (paths, `..`, odd characters) is refused."""
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise JobError(f"invalid job id {job_id!r}: job ids look like 20250101-120000-a1b2c3 "
                       "(see `oppu jobs list`)")
    return job_id


def job_dir(root: str | os.PathLike[str], job_id: str) -> Path:
    return Path(root) / check_job_id(job_id)


def transition(job: dict[str, Any], state: str, *, passed: str | None = None, t: float | None = None,
               **fields: Any) -> dict[str, Any]:
    """Move `job` to `state` and append what it passed through to its `history` (`passed`, default the state
    itself: a resume is recorded as `resumed` and leaves the job queued). The history is never rewritten."""
    t = time.time() if t is None else t
    history = job.setdefault("history", [])
    label = passed or state
    if not history or history[-1].get("state") != label:
        history.append({"state": label, "t": t})
    job.update(fields, state=state)
    return job


def end_attempt(job: dict[str, Any], end: float) -> None:
    """Add the attempt that began at `job['started']` and ended at `end` to the job's accumulated run time."""
    if job.get("started"):
        job["elapsed_before"] = float(job.get("elapsed_before") or 0.0) + max(0.0, end - float(job["started"]))


def elapsed(job: dict[str, Any], now: float) -> float | None:
    """Seconds the job has run over all its attempts (the current one up to `now`)."""
    before = float(job.get("elapsed_before") or 0.0)
    if job.get("state") == "running" and job.get("started"):
        return before + max(0.0, now - float(job["started"]))
    if "elapsed_before" not in job:  # written before attempts were added up: the last attempt alone
        end = job.get("finished")
        return (end or now) - job["started"] if job.get("started") else None
    return before if job.get("history") and any(h["state"] == "running" for h in job["history"]) else None


def write_job(path: Path, job: dict[str, Any]) -> None:
    write_json_atomic(path, job, default=str)


def read_job(root: str | os.PathLike[str], job_id: str) -> dict[str, Any]:
    path = job_dir(root, job_id) / "job.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise JobError(f"no job {job_id} under {root}: list jobs with `oppu jobs list --root {root}`") from None


@contextlib.contextmanager
def root_lock(root: str | os.PathLike[str]) -> Iterator[None]:
    """Serialises state changes and slot accounting between the CLI, the dashboard and workers."""
    with file_lock(Path(root) / ".lock"):
        yield


def append_event(folder: Path, event: dict[str, Any]) -> None:
    line = json.dumps({"t": time.time(), **event}, default=str) + "\n"
    # one write() of a short line to an O_APPEND file: lines from several processes (Ray shares) never interleave
    fd = os.open(folder / "progress.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(folder: Path) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(FileNotFoundError):
        for line in (folder / "progress.jsonl").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash mid-write
                events.append(json.loads(line))
    return events
