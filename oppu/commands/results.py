"""`oppu results`: stored runs and their metrics per method, as tables or JSON.

Metrics are the official LaMP scores by default; `--scoring lenient` shows the same metrics of the answers
`Task.normalize` recovers from free text (`lenient_*`), `--scoring both` shows them side by side: the gap is how
much of a score is answer extraction.
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
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect(db: str, run_id: str | None = None, limit: int = 20, scoring: str = "official") -> list[dict]:
    """[{run_id, task, status, created, tag, users, scoring, metrics: {method: {metric: value}}}], newest first."""
    from oppu.store import Store

    if scoring not in SCORING_CHOICES:
        raise ValueError(f"unknown scoring {scoring!r}: use one of {', '.join(SCORING_CHOICES)}")
    store = Store(db)
    runs = store.latest_runs(limit if run_id is None else 1_000_000)
    if run_id is not None:
        runs = runs[runs.run_id == run_id]
        if runs.empty:
            raise ValueError(f"no run {run_id!r} in {db}: see `oppu results --db {db}` for the run ids")
    out = []
    for row in runs.itertuples():
        metrics: dict[str, dict[str, float]] = {}
        for m in store.run_metrics(row.run_id, None if scoring == "both" else scoring).itertuples():
            metrics.setdefault(m.method, {})[m.metric] = float(m.value)
        out.append({"run_id": row.run_id, "task": row.task, "status": row.status, "created": str(row.created),
                    "tag": row.tag or "", "users": int(row.users), "scoring": scoring, "metrics": metrics})
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
        print(f"{r['run_id']}  {r['task']}  {r['status']}  users={r['users']}  {r['tag']}")
        methods = sorted(r["metrics"])
        names = _column_order({n for m in methods for n in r["metrics"][m]})
        if names:
            width = max(12, *(len(n) + 2 for n in names))
            print("  " + "method".ljust(14) + "".join(n.rjust(width) for n in names))
            for m in methods:
                cells = "".join(f"{r['metrics'][m][n]:{width}.4f}" if n in r["metrics"][m] else " " * width
                                for n in names)
                print("  " + m.ljust(14) + cells)
    if runs and args.scoring == "official":
        print("(official LaMP scoring; --scoring lenient or both shows the answers recovered from free text)")
    return 0
