"""`oppu sweep --kind K`: one of the paper's analyses as a series of runs, each printed like `oppu run`.

`--seeds 0,1,2` runs every member once per seed (`oppu.analyses.sweep_members`), the seeds of one member in one
seed group as `oppu run --seeds` makes them, so the analyses pool them as one setting. `--background` queues the
members as one sweep of jobs (`oppu.jobs.submit_sweep`) instead of running them here.
"""

from __future__ import annotations

import argparse
import os

from oppu.commands.run import (
    ProgressBar,
    add_run_arguments,
    config_from_args,
    fail,
    metric_table,
    usage_errors,
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", required=True,
                        help="k, activity, peft, history-format or behaviour-shift")
    parser.add_argument("--values", help="comma list overriding the sweep's values (k values, PEFT kinds, dates)")
    parser.add_argument("--seeds", help="replicates: comma list of seeds (e.g. 0,1,2); every member runs once per "
                                        "seed, the seeds of a member in one seed group (as oppu run --seeds)")
    parser.add_argument("--background", action="store_true",
                        help="queue the runs as one sweep of background jobs and print its id (see oppu jobs)")
    parser.add_argument("--root", help="jobs folder for --background (default $OPPU_JOBS or runs/jobs)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' configs and stop")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from oppu.analyses import LABELS, sweep_members
    from oppu.runs import flatten

    values = [v.strip() for v in args.values.split(",") if v.strip()] if args.values else None
    try:
        base = config_from_args(args)
        members = sweep_members(args.kind, base, values, args.seeds)
    except ValueError as exc:  # ConfigError, an unknown sweep or bad seeds
        return fail("sweep", exc)
    except usage_errors() as exc:
        return fail("sweep", exc)
    from oppu.experiment import run_experiment
    from oppu.store import Store

    before = flatten(base.to_dict())
    for i, (label, cfg) in enumerate(members, 1):
        # the seed group is a fresh id, said once per group below, not a setting
        changed = {k: v for k, v in flatten(cfg.to_dict()).items() if v != before.get(k) and k != "seed_group"}
        print(f"[{i}/{len(members)}] {label}: {changed}")
        if args.dry_run or args.background:
            continue
        bar = ProgressBar(not args.quiet)
        try:
            run_id = run_experiment(cfg, progress=bar)
        except usage_errors() as exc:
            return fail("sweep", exc)
        finally:
            bar.close()
        print(f"run {run_id}")
        print(metric_table(Store(cfg.db).run_metrics(run_id)))
        if cfg.seed_group and (i == len(members) or members[i][1].seed_group != cfg.seed_group):
            print(f"seed group {cfg.seed_group} ({LABELS[args.kind](cfg)}): `oppu results --group "
                  f"{cfg.seed_group} --db {cfg.db}` prints its intervals over users and seeds")
    if args.background and not args.dry_run:
        return _submit(args, members)
    return 0


def _submit(args: argparse.Namespace, members) -> int:
    """`--background`: every member a job of one sweep, listed as one group (Train page, `group_sweeps`)."""
    from oppu import jobs

    root = args.root or os.environ.get("OPPU_JOBS", jobs.DEFAULT_ROOT)
    try:
        sweep_id = jobs.submit_sweep(members, root, kind=args.kind)
    except usage_errors() as exc:
        return fail("sweep", exc)
    print(f"sweep {sweep_id}: {len(members)} jobs queued under {root}; follow them with `oppu jobs list --root "
          f"{root}` or on the dashboard's Train page")
    return 0
