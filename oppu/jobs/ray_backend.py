"""Ray backend (`backend="ray"`): a job's users split into shares, each share run as one Ray task.

Each task loads the base model once and calls the runner on its share with the same run_id. Every share writes
to the same results store file and the same job folder, so on a multi-node cluster the store path, the artifacts
folder and the jobs root must be on a filesystem shared by all nodes (NFS or similar); a crashed or killed Ray
task is reported as a failed job, never a hang.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from pathlib import Path
from typing import Any

from oppu.jobs.folder import JobError, append_event
from oppu.jobs.lifecycle import resolve_users
from oppu.jobs.worker import (
    CANCEL_GRACE_S,
    LogProgress,
    cancel_flag,
    progress_writer,
    resolve_runner,
    share_log,
)


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


def _ray_share(runner_spec: str | None, config: dict[str, Any], run_id: str, folder: str, share: int) -> str:
    """One Ray task: run the runner (one base-model load) on a share of the users, same run id and store."""
    from oppu.config import RunConfig

    path = Path(folder)
    cfg = RunConfig.from_dict(config)
    run = resolve_runner(runner_spec)
    # A share must not mark the shared run done: run_ray_job does that once, after the last share.
    extra = {"finalize": False} if "finalize" in inspect.signature(run).parameters else {}
    write = share_log(path, share)
    write(f"{len(cfg.user_ids or ())} user(s): {', '.join(cfg.user_ids or ())}")
    progress = LogProgress(progress_writer(path, share=share), write)
    return run(cfg, progress=progress, should_stop=cancel_flag(path), store=None,
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
    append_event(folder, {"stage": "ray", "shares": len(parts), "users_total": len(users)})
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
