"""`oppu jobs submit|list|show|cancel|resume|logs`: background training jobs from the command line.

`submit` takes the same run options as `oppu run` (`oppu.commands.run.add_run_arguments` / `config_from_args`),
queues the run and prints the job id at once; the work happens in a detached `oppu worker` process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from oppu.commands.run import add_run_arguments, config_from_args


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=None, help="jobs folder (default $OPPU_JOBS or runs/jobs)")
    # --root is also accepted after the action; SUPPRESS keeps a sub-parser from resetting a value given before
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help="jobs folder (default $OPPU_JOBS or runs/jobs)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    submit = sub.add_parser("submit", parents=[common],
                            help="queue a run as a background job and return its id at once")
    add_run_arguments(submit)
    submit.add_argument("--backend", choices=("local", "ray"), default="local")
    submit.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    submit.add_argument("--shares", type=int, default=None, help="Ray tasks to split the users into")
    submit.add_argument("--max-workers", type=int, default=None, help="local workers at once (default 1)")
    sub.add_parser("list", parents=[common], help="every job, newest first")
    for name, text in (("show", "state and progress of one job"), ("resume", "continue a stopped job"),
                       ("retry", "run a failed job again on the same run"),
                       ("cancel", "stop a job; finished users stay stored")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("job_id")
    sub.choices["cancel"].add_argument("--wait", type=float, default=10.0,
                                       help="seconds to wait before SIGTERM (default 10; 0 = just flag it)")
    logs = sub.add_parser("logs", parents=[common], help="print a job's worker log")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job stops")


def progress_line(job: dict[str, Any], width: int = 30) -> str:
    """`[#####.....] 40% running · train_user · user 2 of 5 · step 3/8 · loss 1.234 · 1m05s elapsed · ~2m left`"""
    fraction = job.get("progress")
    bar = "#" * round((fraction or 0) * width)
    parts = [f"[{bar:.<{width}}] {'?' if fraction is None else f'{fraction:4.0%}'} {job['state']}"]
    if job.get("phase") or job.get("stage"):
        parts.append(str(job.get("phase") or job["stage"]))
    if job.get("users_total") and job.get("user_index"):
        parts.append(f"user {job['user_index']} of {job['users_total']}")
    elif job.get("users_total"):
        parts.append(f"users done {job.get('users_done') or 0} of {job['users_total']}")
    if job.get("steps_total"):
        parts.append(f"step {job.get('step') or 0}/{job['steps_total']}")
    if job.get("loss") is not None:
        parts.append(f"loss {job['loss']:.3f}")
    if job.get("elapsed_s") is not None:
        parts.append(f"{_duration(job['elapsed_s'])} elapsed")
    if job.get("eta_s") is not None:
        parts.append(f"~{_duration(job['eta_s'])} left")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run(args: argparse.Namespace) -> int:
    from oppu import jobs

    root = args.root or os.environ.get("OPPU_JOBS", jobs.DEFAULT_ROOT)
    if args.action == "submit":
        job_id = jobs.submit(config_from_args(args), root, backend=args.backend, address=args.address,
                             shares=args.shares, max_workers=args.max_workers)
        print(job_id)
        print(f"follow it with: oppu jobs show {job_id}   (or: oppu jobs logs {job_id} --follow)",
              file=sys.stderr)
    elif args.action == "list":
        for job in jobs.list_jobs(root):
            print(f"{job['job_id']}  {job['state']:<11} {job.get('task') or '':<8} {progress_line(job, 20)}")
    elif args.action == "show":
        job = jobs.get_job(root, args.job_id)
        print(f"job {job['job_id']} (run {job['run_id']}, backend {job['backend']})")
        print(progress_line(job))
        if job.get("error"):
            print(f"error: {job['error']}")
    elif args.action == "cancel":
        print(jobs.cancel(root, args.job_id, wait_s=args.wait))
    elif args.action == "resume":
        print(jobs.resume(root, args.job_id))
    elif args.action == "retry":
        print(jobs.retry(root, args.job_id))
    elif args.action == "logs":
        return _logs(jobs, root, args.job_id, args.follow)
    return 0


def _logs(jobs: Any, root: str, job_id: str, follow: bool) -> int:
    text = jobs.logs(root, job_id)
    sys.stdout.write(text)
    seen = len(text)
    while follow and jobs.get_job(root, job_id)["state"] in ("queued", "running"):
        time.sleep(1.0)
        text = jobs.logs(root, job_id)
        sys.stdout.write(text[seen:])
        sys.stdout.flush()
        seen = len(text)
    sys.stdout.write(jobs.logs(root, job_id)[seen:])
    return 0
