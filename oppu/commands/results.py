"""`oppu results`: stored runs and their metrics per method, as tables or JSON.

Metrics are the official LaMP scores by default; `--scoring lenient` shows the same metrics of the answers
`Task.normalize` recovers from free text (`lenient_*`), `--scoring both` shows them side by side: the gap is how
much of a score is answer extraction.

With `--run RUN` or `--group GROUP` (the runs of `oppu run --seeds`) it also prints how sure each number is:
per method the mean per-query score with a 95% interval from a bootstrap over users (and seeds), and every
method's paired difference against a reference row (`--reference`, default the non-personalized one) with its
interval, a sign-flip permutation p-value and the queries it wins, ties and loses (`oppu.stats`).
"""

from __future__ import annotations

import argparse
import json
import sys

SCORING_CHOICES = ("official", "lenient", "both")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default="runs/oppu.duckdb", help="results store (default runs/oppu.duckdb)")
    parser.add_argument("--run", help="only this run id")
    parser.add_argument("--limit", type=int, default=20, help="newest runs shown (default 20)")
    parser.add_argument("--scoring", choices=SCORING_CHOICES, default="official",
                        help="official: the LaMP evaluation on the stripped raw answer (default); lenient: on the "
                             "label or number recovered from free text (metrics named lenient_*); both")
    parser.add_argument("--group", help="only this seed group (`oppu run --seeds`): intervals over users and seeds")
    parser.add_argument("--reference", help="method every other one is compared with (default: none, the "
                                            "non-personalized row, when the run has it)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect(db: str, run_id: str | None = None, limit: int = 20, scoring: str = "official") -> list[dict]:
    """[{run_id, task, status, created, tag, seed, seed_group, users, scoring, metrics: {method: {metric: value}}}],
    newest first."""
    from oppu.store import Store

    if scoring not in SCORING_CHOICES:
        raise ValueError(f"unknown scoring {scoring!r}: use one of {', '.join(SCORING_CHOICES)}")
    store = Store(db)
    runs = store.latest_runs(limit if run_id is None else 1_000_000)
    if run_id is not None:
        runs = runs[runs.run_id == run_id]
        if runs.empty:
            raise ValueError(f"no run {run_id!r} in {db}: see `oppu results --db {db}` for the run ids")
    configs = {r.run_id: json.loads(r.config or "{}") for r in store.runs()[["run_id", "config"]].itertuples()}
    out = []
    for row in runs.itertuples():
        config = configs.get(row.run_id, {})
        metrics: dict[str, dict[str, float]] = {}
        for m in store.run_metrics(row.run_id, None if scoring == "both" else scoring).itertuples():
            metrics.setdefault(m.method, {})[m.metric] = float(m.value)
        out.append({"run_id": row.run_id, "task": row.task, "status": row.status, "created": str(row.created),
                    "tag": row.tag or "", "seed": int((config.get("user_train") or {}).get("seed", 0)),
                    "seed_group": config.get("seed_group") or "", "users": int(row.users), "scoring": scoring,
                    "metrics": metrics})
    return out


def _column_order(names: set[str]) -> list[str]:
    """Official metrics first, each lenient twin after them in the same order."""
    from oppu.metrics import LENIENT_PREFIX

    return sorted(names, key=lambda n: (n.startswith(LENIENT_PREFIX), n.removeprefix(LENIENT_PREFIX)))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from oppu.commands.run import fail

    if not Path(args.db).is_file():
        return fail("results", FileNotFoundError(f"no results store at {args.db}: run `oppu run` first or "
                                                 "pass --db"))
    if args.group or args.run:
        return _show_uncertain(args)
    try:
        runs = collect(args.db, args.run, args.limit, args.scoring)
    except ValueError as exc:
        return fail("results", exc)
    if args.json:
        json.dump(runs, sys.stdout, indent=1)
        print()
        return 0
    if not runs:
        print(f"no runs in {args.db}")
    for r in runs:
        group = f"  seed {r['seed']} of group {r['seed_group']}" if r["seed_group"] else ""
        print(f"{r['run_id']}  {r['task']}  {r['status']}  users={r['users']}  {r['tag']}{group}")
        methods = sorted(r["metrics"])
        names = _column_order({n for m in methods for n in r["metrics"][m]})
        if names:
            width = max(12, *(len(n) + 2 for n in names))
            print("  " + "method".ljust(14) + "".join(n.rjust(width) for n in names))
            for m in methods:
                cells = "".join(f"{r['metrics'][m][n]:{width}.4f}" if n in r["metrics"][m] else " " * width
                                for n in names)
                print("  " + m.ljust(14) + cells)
    if any(r["seed_group"] for r in runs):
        print("(`oppu results --group GROUP` pools a group's seeds into intervals over users and seeds)")
    elif runs:
        print("(`oppu results --run RUN_ID` adds 95% intervals and paired differences against --reference)")
    if runs and args.scoring == "official":
        print("(official LaMP scoring; --scoring lenient or both shows the answers recovered from free text)")
    return 0


def _show_uncertain(args: argparse.Namespace) -> int:
    """`--run` or `--group`: the metric table(s), then intervals and paired differences."""
    from oppu.commands.run import fail
    from oppu.store import Store, StoreError
    from oppu.uncertainty import format_lines, uncertainty

    store = Store(args.db)
    scoring = "official" if args.scoring == "both" else args.scoring
    try:
        if args.group:
            runs = store.group_runs(args.group)
            if runs.empty:
                groups = store.seed_groups(10)["seed_group"].tolist()
                raise ValueError(f"no seed group {args.group!r} in {args.db}"
                                 + (f": known groups {', '.join(groups)}" if groups else
                                    ": `oppu run --seeds 0,1,2` makes one"))
            run_ids = list(runs["run_id"])
            tables = [r for rid in run_ids for r in collect(args.db, rid, scoring=args.scoring)]
        else:
            tables = collect(args.db, args.run, scoring=args.scoring)
            run_ids = [args.run]
        result = uncertainty(store, run_ids, scoring, args.reference, args.n_boot)
    except (ValueError, StoreError) as exc:
        return fail("results", exc)
    if args.json:
        json.dump({"runs": tables, "group": args.group or store.run_group(args.run), **result}, sys.stdout,
                  indent=1, default=str)
        print()
        return 0
    if args.group:
        print(f"seed group {args.group}: {len(run_ids)} runs")
    else:
        group = store.run_group(args.run)
        print(f"{args.run}  {tables[0]['task']}  {tables[0]['status']}  users={tables[0]['users']}"
              + (f"  (seed group {group}: `--group {group}` pools its seeds)" if group else ""))
    for line in format_lines(result):
        print(line)
    return 0
