"""The worker: runs one job in its own process (`oppu worker JOB_ID`), keeps its heartbeat, honours cancel.

It resolves the job's runner (`module:function`, by default `oppu.experiment.run_experiment`), creates the run in
the results store linked to the job, calls the runner with a progress callback that appends to the job's event
log and a `should_stop` that reads the cancel flag, and records the final state in job.json whatever happens.
Ray jobs hand their users to `oppu.jobs.ray_backend` instead of calling the runner here.

The worker log (`worker.log`) is meant to be read: the resolved config, the plan, each stage's start and end,
one line every `LOG_EVERY` steps with the loss and the speed, and a failure's error with its causes; library
noise (weight-loading bars, FutureWarnings, transformers' info lines) is silenced before the runner imports it.
"""

from __future__ import annotations

import _thread
import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oppu.jobs.folder import (
    DEFAULT_RUNNER,
    RUNNER_RE,
    JobError,
    append_event,
    end_attempt,
    job_dir,
    read_job,
    root_lock,
    transition,
    write_job,
)
from oppu.jobs.lifecycle import pid_alive, reconcile
from oppu.jobs.progress import progress_event

LOG_EVERY = int(os.environ.get("OPPU_LOG_EVERY", "10"))
"""Steps between two progress lines of a training stage in the worker log."""
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}
"""Set for the worker process so that libraries keep their progress bars and deprecation notes out of its log."""
HEARTBEAT_S = 2.0
"""How often the worker touches its heartbeat file."""
CANCEL_GRACE_S = 3.0
"""After a cancel request, how long the worker lets the runner stop on its own before interrupting it."""

Runner = Callable[..., Any]


class _Stopped(BaseException):
    """Raised in the worker's main thread by SIGTERM or a cancel that the runner did not honour in time."""


def resolve_runner(spec: str | None) -> Runner:
    """`module:function` -> the function (default: `oppu.experiment.run_experiment`)."""
    spec = spec or DEFAULT_RUNNER
    if not RUNNER_RE.fullmatch(spec):
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
    with root_lock(root):
        job = read_job(root, job_id)
        other = job.get("pid")
        if job["state"] == "running" and other not in (None, os.getpid()) and pid_alive(other):
            print(f"job {job_id} already has a live worker (pid {other}); not starting another", file=sys.stderr)
            return 2
        if job["state"] not in ("queued", "running"):
            again = "retry" if job["state"] == "failed" else "resume"
            print(f"job {job_id} is {job['state']}: {again} it with `oppu jobs {again} {job_id}`", file=sys.stderr)
            return 2
        transition(job, "running", pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                   finished=None, attempts=int(job.get("attempts") or 0) + 1)
        write_job(folder / "job.json", job)
    _quiet_libraries()
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
        done_before = store.done_users(job["run_id"])
        append_event(folder, {"stage": "started" if job["attempts"] == 1 else "resumed", "attempt": job["attempts"],
                               "users_total": len(job.get("users") or ()) or (len(cfg.user_ids) if cfg.user_ids
                                                                                else cfg.users),
                               "users_done_before": len(done_before)})
        _log(f"job {job_id}: attempt {job['attempts']}, run {job['run_id']}, {len(done_before)} user(s) already done")
        _log("resolved config: " + json.dumps(cfg.to_dict(), sort_keys=True, default=str))
        stages = _plan(cfg, done_before)
        if stages is not None:
            append_event(folder, {"stage": "plan", "stages": stages})
        if job["backend"] == "ray":
            # imported here, not at the top: ray_backend builds on this module
            from oppu.jobs.ray_backend import run_ray_job

            run_ray_job(job, cfg, folder, store)
        else:
            run(cfg, progress=LogProgress(progress_writer(folder)), should_stop=cancel_flag(folder), store=store,
                run_id=job["run_id"], job_id=job["job_id"])
        if (folder / "cancel").exists():
            final = {"state": "cancelled"}
        else:
            final = {"state": "done"}
            append_event(folder, {"stage": "done"})
    except (_Stopped, KeyboardInterrupt) as err:
        asked = (folder / "cancel").exists()
        final = {"state": "cancelled" if asked else "interrupted",
                 "error": None if asked else f"interrupted: worker stopped by {err or 'an interrupt'}"}
    except BaseException as err:  # noqa: BLE001 - every failure must land in job.json, then the worker exits
        # A cancel that interrupts a library mid-call can surface as that library's own error (a load wrapped in
        # ModelLoadError, say): once a cancel was asked, the job is cancelled (resumable), the error kept.
        state = "cancelled" if (folder / "cancel").exists() else "failed"
        final = {"state": state, "error": one_line_error(err), "traceback": traceback.format_exc()}
        _log(f"{state}: {final['error']}")
        for cause in _causes(err)[1:]:
            _log(f"  caused by {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
        print("traceback:\n" + final["traceback"], file=sys.stderr)
    finally:
        beat.stopped.set()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if store is not None and final.get("state") != "done":
            with contextlib.suppress(Exception):
                store.set_status(job["run_id"], final.get("state", "failed"))
        with root_lock(root):
            job = read_job(root, job_id)
            now = time.time()
            if job.get("state") == "running":  # not already recorded interrupted by a reader
                end_attempt(job, now)
            transition(job, final.get("state", "failed"), **{k: v for k, v in final.items() if k != "state"},
                       finished=now)
            write_job(folder / "job.json", job)
            reconcile(root)  # a slot is free: start the next queued job
    print(f"job {job_id}: {final.get('state')}" + (f" ({final['error']})" if final.get("error") else ""),
          file=sys.stderr)
    return {"done": 0, "failed": 1}.get(final.get("state", "failed"), 3)


def _log(line: str) -> None:
    print(time.strftime("%H:%M:%S ") + line, file=sys.stderr, flush=True)


def _causes(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def one_line_error(err: BaseException) -> str:
    """A failure in one line: a user-facing error's own message, else the exception type and first line."""
    from oppu.errors import OppuError

    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, OppuError):
        return first or type(err).__name__
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _quiet_libraries() -> None:
    import logging
    import warnings

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    for name in ("transformers", "peft", "huggingface_hub", "sentence_transformers", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("oppu").setLevel(logging.INFO)


def _plan(cfg: Any, done_users: Any) -> list[dict[str, Any]] | None:
    """The run's plan (`oppu.jobs.plan.plan_run`) as JSON stages, written to the log; None when the data cannot
    be read here (the runner then reports the problem itself)."""
    from oppu.jobs.plan import plan_units
    from oppu.splits import run_data

    try:
        from oppu.jobs.plan import plan_run

        stages = plan_run(cfg, run_data(cfg), done_users)
    except Exception as err:  # noqa: BLE001 - progress falls back to counting users
        _log(f"no plan ({one_line_error(err)}): progress counts finished users only")
        return None
    units = plan_units(stages)
    _log(f"plan: {sum(1 for s in stages if s.kind == 'adapt')} task adaptation stage(s), {units['adapt']} steps; "
         f"{sum(1 for s in stages if s.kind == 'user')} user stage(s), {units['user']} steps; "
         f"{units['generate']} answers")
    return [s.to_dict() for s in stages]


def share_log(folder: Path, share: int) -> Callable[[str], None]:
    """The log writer of a Ray share: its lines go into the job's worker.log (a Ray task's own stderr lands in
    Ray's session logs, where nobody reading the job would look), each prefixed with the share. One short append
    per line (O_APPEND), so the lines of concurrent shares interleave whole."""
    path = folder / "worker.log"

    def write(line: str) -> None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(time.strftime("%H:%M:%S ") + f"share {share}: {line}\n")

    return write


class LogProgress:
    """Passes every report on to the job's event log and writes the readable lines of the worker log."""

    def __init__(self, inner: Callable[..., None], write: Callable[[str], None] | None = None):
        self.inner = inner
        self.write = write or _log
        self.started: dict[str, tuple[float, int]] = {}
        self.last: dict[str, tuple[float, int]] = {}

    def __call__(self, *args: Any) -> None:
        self.inner(*args)
        if len(args) != 4:
            return
        stage, step, total, loss = args
        now = time.monotonic()
        if stage == "users":
            self.write(f"users done: {step} of {total}")
            return
        if stage not in self.started:
            self.started[stage] = self.last[stage] = (now, int(step or 0))
            what = "rows" if str(stage).startswith("generate") else "steps"
            self.write(f"{stage}: start ({total} {what}" + (f", continuing at {step}" if step else "") + ")")
            if not (total and step == total):
                return
        t0, s0 = self.last[stage]
        if loss is not None and (step % LOG_EVERY == 0 or step == total):
            speed = (now - t0) / max(1, step - s0)
            self.write(f"{stage}: step {step}/{total} loss {loss:.4f} ({speed:.2f} s/step)")
            self.last[stage] = (now, step)
        if total is not None and step == total:
            begin, first = self.started[stage]
            self.write(f"{stage}: done in {now - begin:.1f} s" + (f" ({(now - begin) / (step - first):.2f} s/step)"
                                                              if step > first and loss is not None else ""))


def progress_writer(folder: Path, **extra: Any) -> Callable[..., None]:
    def progress(*args: Any) -> None:
        append_event(folder, {**progress_event(*args), **extra})

    return progress


def cancel_flag(folder: Path) -> Callable[[], bool]:
    return lambda: (folder / "cancel").exists()


def _open_store(cfg: Any, job: dict[str, Any]) -> Any:
    """Create the run up front so the store links it to this job (the runner fills in what it learns later)."""
    from oppu.experiment import code_version, portable_config
    from oppu.model import model_key
    from oppu.store import Store

    store = Store(cfg.db)
    # Same portable config and code version as run_experiment records: the first writer of a run wins.
    store.create_run(job["run_id"], portable_config(cfg), task=cfg.task, model=model_key(cfg.model),
                     data_fingerprint="", code_version=code_version(), tag=cfg.tag, job_id=job["job_id"])
    return store
