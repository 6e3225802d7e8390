"""Regenerate docs/DEFAULT_RUNS.md: the default run on every LaMP task of the demo data, one table per task.

    python -m bench.results                 # all seven tasks, the default config (15-75 min a task on 2 cores)
    python -m bench.results --tasks LaMP_2M,LaMP_3 --users 2

Each task runs exactly what `oppu run --task <task> --dtype float32` runs with the default config (plus `--users` when
given; float32 so that the numbers reproduce on any x86 CPU, whatever its bf16 support), into
a results store of its own (`runs/results/oppu.duckdb`), and the file shows every method's official LaMP score, the
lenient reading beside it, the number of users and queries, the command and the machine. The numbers are a few
users' worth: a direction, not a significance test.
"""

from __future__ import annotations

import argparse
import json
import platform
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import ROOT, machine_info, markdown_table

OUT = ROOT / "docs" / "DEFAULT_RUNS.md"
WORK = ROOT / "runs" / "results"

_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The instruction-set flags that change float speed and rounding here (from /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in _CPU_FLAGS if f in present]
    except OSError:
        pass
    return []


def _command(task: str, users: int | None) -> str:
    return f"oppu run --task {task} --dtype float32" + (f" --users {users}" if users is not None else "")


def run_task(task: str, users: int | None) -> dict:
    """One default run of `task` into the results store (float32 on purpose: bf16 answers depend on the CPU's bf16
    arithmetic, float32 answers reproduce on any x86 CPU); returns its run id and wall time."""
    from oppu.config import build_config
    from oppu.experiment import run_experiment
    from oppu.store import Store

    overrides = {"task": task, "db": str(WORK / "oppu.duckdb"), "artifacts_dir": str(WORK / "artifacts"),
                 "model.dtype": "float32"}
    if users is not None:
        overrides["users"] = users
    cfg = build_config(None, overrides)
    store = Store(cfg.db)
    start = time.perf_counter()
    run_id = run_experiment(cfg, store=store)
    return {"task": task, "run_id": run_id, "wall_s": time.perf_counter() - start}


def stored_task(task: str) -> dict | None:
    """The newest finished run of `task` in the results store, summarized (for `--render-only`)."""
    from oppu.config import RunConfig
    from oppu.store import Store

    store = Store(WORK / "oppu.duckdb")
    runs = store.runs()
    runs = runs[(runs.task == task) & (runs.status == "done")]
    if runs.empty:
        return None
    run = runs.iloc[0]
    cfg = RunConfig.from_dict(json.loads(run["config"]))
    users = None if cfg.users == RunConfig().users else cfg.users
    wall = (run["finished"] - run["created"]).total_seconds()
    result = summarize(store, run["run_id"], task, cfg.methods, _command(task, users), wall)
    return {**result, "started": run["created"].strftime("%Y-%m-%d %H:%M")}


def summarize(store, run_id: str, task: str, methods, command: str, wall: float) -> dict:
    """Metric rows (official, lenient, per-query mean with its interval, n) and paired differences of one run."""
    from oppu.config import method_label
    from oppu.stats import method_summary, paired_difference, per_query_scores
    from oppu.tasks import get_task

    metrics = store.run_metrics(run_id, scoring=None)
    scores = per_query_scores(store.run_predictions(run_id), scoring="official")
    summary = method_summary(scores).set_index("method")
    higher = get_task(task).kind != "rating"  # LaMP_3's per-query score is an absolute error
    rows = []
    for method in methods:
        values = {r.metric: r.value for r in metrics[metrics.method == method].itertuples()}
        row = {"method": method_label(method)}
        row.update({name: values[name] for name in sorted(values) if not name.startswith("lenient_")})
        row.update({name: values[name] for name in sorted(values) if name.startswith("lenient_")})
        if method in summary.index:
            s = summary.loc[method]
            row["per-query mean [95% CI]"] = f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
            row["users"], row["queries"] = int(s["n_users"]), int(s["n_queries"])
        rows.append(row)
    pairs = [(a, b) for a, b in (("oppu", "none"), ("oppu+rag", "rag"), ("oppu+pag", "pag"), ("oppu", "rag"))
             if a in methods and b in methods]
    differences = []
    for a, b in pairs:
        d = paired_difference(scores, a, b, higher_is_better=higher)
        differences.append(f"{method_label(a)} − {method_label(b)}: {d['diff']:+.3f} "
                           f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p = {d['p_value']:.2f}; "
                           f"queries won / tied / lost: {d['wins']} / {d['ties']} / {d['losses']}")
    return {"task": task, "run_id": run_id, "command": command, "wall_s": wall, "rows": rows,
            "differences": differences, "score": store_score_name(task)}


def store_score_name(task: str) -> str:
    from oppu.metrics import row_score_name

    name, lower_is_better = row_score_name(task, "official")
    return f"{name} ({'lower' if lower_is_better else 'higher'} is better)"


def render(results: list[dict], machine: dict, started: str, missing: Sequence[str] = ()) -> str:
    from oppu.config import RunConfig

    cfg = RunConfig()
    intro = (
        "Generated by `python -m bench.results` (do not edit by hand). Every table is one default run: the command "
        "under it, the default config (`oppu/config.py`), the embedded SmolLM2-135M-Instruct, the multi-LoRA "
        "engine, float32 (`--dtype float32`: the same answers on any x86 CPU), greedy decoding, seed 0. Scores are the official LaMP evaluation of the stripped raw "
        "output (`docs/PROTOCOL.md`); the `lenient_*` columns read the same outputs with a label or digit "
        "recovered from free text, to show how much of a score is extraction. The interval is a 95% bootstrap "
        "interval over users (their queries resampled with them, `oppu.stats`); paired differences compare two "
        "methods on the same queries, with a user-level sign-flip permutation p-value. With "
        f"{cfg.users} users and a handful of queries each, the intervals are wide: read a direction, not a "
        "finding. Wall times include whatever else shared the CPU: they are not benchmarks (docs/PERFORMANCE.md "
        "has those)."
    )
    machine_line = (
        f"Machine: {machine['cpu']} ({machine['cores']} cores; flags: {', '.join(cpu_flags()) or 'none of note'}), "
        f"Python {platform.python_version()}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"peft {machine['peft']}. Started {started} UTC."
    )
    sizes = (
        f"Default sizes: the {cfg.users} most active users; task adaptation on up to "
        f"{cfg.adaptation_train.max_examples} of the other users' gold-labelled queries per prompt style "
        f"({cfg.adaptation_train.epochs} epoch, batch {cfg.adaptation_train.batch_size}, lr "
        f"{cfg.adaptation_train.lr:g}); per-user LoRA on the {cfg.user_train.max_examples} most recent items "
        f"({cfg.user_train.epochs} epochs, batch {cfg.user_train.batch_size}, lr {cfg.user_train.lr:g}); BM25 "
        f"k={cfg.retrieval.k}; cutoff {cfg.user_train.max_length} tokens."
    )
    lines = ["# Default runs on the demo data", ""]
    for paragraph in (intro, machine_line, sizes):
        lines += [textwrap.fill(paragraph, width=116, break_on_hyphens=False), ""]
    for result in results:
        lines += [f"## {result['task']}", "", markdown_table(result["rows"]), "",
                  f"Per-query score: {result['score']}.", ""]
        lines += [f"- {d}" for d in result["differences"]]
        footer = (f"`{result['command']}` — run `{result['run_id']}`, {result['wall_s']:.0f} s wall "
                  "(task adaptation included unless cached).")
        lines += ["", footer, ""]
    reproduce = ("One table alone: the command under it. Runs go to `runs/results/`; open that store in the "
                 "dashboard with `oppu dashboard --db runs/results/oppu.duckdb`.")
    if missing:
        lines += ["## Not run yet", "", textwrap.fill(
            f"No finished default run of {', '.join(missing)} is in this file yet (each takes 15-75 minutes on this "
            "2-core CPU, most of it the two task adaptations): "
            f"`python -m bench.results --tasks {','.join(missing)}` adds them.", width=116), ""]
    lines += ["## Reproduce", "", "```", "make setup && .venv/bin/python -m oppu prepare",
              ".venv/bin/python -m bench.results", "```", "", reproduce, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from oppu.tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help="comma list of task ids to run (default: all seven); the file shows every task stored")
    parser.add_argument("--users", type=int, default=None, help="test users per task (default: the config's)")
    parser.add_argument("--out", default=str(OUT), help="where to write the Markdown (default: docs/DEFAULT_RUNS.md)")
    parser.add_argument("--render-only", action="store_true",
                        help="write the file from the newest finished runs in runs/results/ without running anything")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    if not args.render_only:
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            print(json.dumps(run_task(task, args.users)), flush=True)
    # The file always shows every task's newest finished run in the store, so runs of a few tasks add to it.
    results, missing = [], []
    for task in TASKS:
        result = stored_task(task)
        if result is None:
            missing.append(task)
        else:
            results.append(result)
    started = min([started, *(r["started"] for r in results)])
    Path(args.out).write_text(render(results, machine_info(), started, missing))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
