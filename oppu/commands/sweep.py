"""`oppu sweep --kind K`: one of the paper's analyses as a series of runs, each printed like `oppu run`."""

from __future__ import annotations

import argparse

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
    parser.add_argument("--dry-run", action="store_true", help="print the runs' configs and stop")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from oppu.analyses import sweep_configs
    from oppu.experiment import run_experiment
    from oppu.store import Store

    values = [v.strip() for v in args.values.split(",") if v.strip()] if args.values else None
    try:
        base = config_from_args(args)
        configs = sweep_configs(args.kind, base, values)
    except ValueError as exc:
        return fail("sweep", exc)
    except usage_errors() as exc:
        return fail("sweep", exc)
    for i, cfg in enumerate(configs, 1):
        changed = {k: v for k, v in cfg.to_dict().items() if v != base.to_dict().get(k)}
        print(f"[{i}/{len(configs)}] {args.kind}: {changed}")
        if args.dry_run:
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
    return 0
