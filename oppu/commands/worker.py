"""`oppu worker JOB_ID [--root DIR]`: run one job in this process (started by `oppu jobs submit`)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", help="the job to run (its folder under --root)")
    parser.add_argument("--root", default=None, help="jobs folder (default $OPPU_JOBS or runs/jobs)")


def run(args: argparse.Namespace) -> int:
    import os

    from oppu.jobs import DEFAULT_ROOT, run_worker

    root = args.root or os.environ.get("OPPU_JOBS", DEFAULT_ROOT)
    return run_worker(root, args.job_id)
