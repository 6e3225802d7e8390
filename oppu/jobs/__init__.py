"""Training jobs: submit a run to a background worker process, watch its progress, cancel it, resume it.

One module per concern:

    folder.py       a job's folder: ids, job.json, the progress event log, the root lock
    progress.py     pure summaries of the event log (stage, user i of N, loss, ETA)
    lifecycle.py    local lifecycle: submit, list, show, cancel, resume, logs; starting and reaping workers
    worker.py       the worker process (`oppu worker JOB_ID`): heartbeat, cancel, final state
    ray_backend.py  the Ray backend: a job's users split into shares run as Ray tasks
    plan.py         a run's stages and their sizes, known before it starts (progress and estimates)
    sweeps.py       the runs of one analysis as one object: submit, group, preview, cancel

This package re-exports the public names, so `from oppu import jobs; jobs.submit(...)` is the API.
"""

from oppu.jobs.folder import (
    BACKENDS,
    DEFAULT_MAX_WORKERS,
    DEFAULT_ROOT,
    DEFAULT_RUNNER,
    FINAL_STATES,
    RESUMABLE_STATES,
    STATES,
    JobError,
    check_job_id,
    job_dir,
    new_job_id,
)
from oppu.jobs.lifecycle import (
    STALE_S,
    cancel,
    get_job,
    list_jobs,
    logs,
    resolve_users,
    resume,
    retry,
    submit,
)
from oppu.jobs.plan import Stage, plan_run
from oppu.jobs.progress import progress_event, summarize_progress
from oppu.jobs.ray_backend import run_ray_job, split_users
from oppu.jobs.sweeps import cancel_sweep, group_sweeps, submit_sweep
from oppu.jobs.worker import CANCEL_GRACE_S, HEARTBEAT_S, Runner, resolve_runner, run_worker

__all__ = [
    "BACKENDS",
    "CANCEL_GRACE_S",
    "DEFAULT_MAX_WORKERS",
    "DEFAULT_ROOT",
    "DEFAULT_RUNNER",
    "FINAL_STATES",
    "HEARTBEAT_S",
    "RESUMABLE_STATES",
    "STALE_S",
    "STATES",
    "JobError",
    "Runner",
    "Stage",
    "cancel",
    "cancel_sweep",
    "check_job_id",
    "get_job",
    "group_sweeps",
    "job_dir",
    "list_jobs",
    "logs",
    "new_job_id",
    "plan_run",
    "progress_event",
    "resolve_runner",
    "resolve_users",
    "resume",
    "retry",
    "run_ray_job",
    "run_worker",
    "split_users",
    "submit",
    "submit_sweep",
    "summarize_progress",
]
