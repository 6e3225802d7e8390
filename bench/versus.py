"""One `oppu run` command at two versions of the code: the version the CPU-speed targets were set against
(`BASELINE_REF`) and the working tree, each in its own process on the same machine, one after the other.

Why processes and a checkout: the default a researcher had then differs from today's in many places at once
(the dtype policy, the engines, prefill and training-pass changes), so "how much faster is a run now" is only
answered by running the old code itself. Everything else is shared: the Python environment, the model cache,
the demo data (unchanged since then), the flags. The old tree comes from `git archive BASELINE_REF` into a
temporary folder, so this needs the repository's history (any clone of it has it).

Workload (defaults): `oppu run --task LaMP_2M --users 8 --methods none,rag,oppu,oppu+rag --no-adapt` into a
fresh store and artifacts folder per run. The target's run has its task-adapted base cached; both versions merge
a cached adapter into the base at load, so leaving adaptation out changes the work of neither by more than that
merge and saves training one adapted base per version first. Each version uses its own defaults (dtype
included), as a user typing the command would get.

Target: the working tree's run >= 2x faster in wall time. Also reported: CPU time and peak RSS of each process,
and each version's metric table (the protocol changed between the two, so their scores need not agree).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import MODEL_CACHE, ROOT, alternating, append_report, markdown_table, verdict

BASELINE_REF = "20fccf4"
"""main on 2026-11-26, when the CPU-speed targets were set: float32 on every CPU, per-user training passes of
256 tokens with torch's sdpa attention, every prompt prefilled in full."""
TARGET_SPEEDUP = 2.0


@dataclass(frozen=True)
class ChildRun:
    seconds: float
    cpu_seconds: float
    """User + system CPU time of the child process (its threads included)."""
    peak_mib: float
    returncode: int
    output: str


def timed_child(command: list[str], cwd: Path, env: dict[str, str]) -> ChildRun:
    """Run `command` to completion; wall time, and CPU time and peak RSS from the kernel's accounting of that
    one child (`wait4`), so neither this process nor an earlier child is counted."""
    with tempfile.TemporaryFile(mode="w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        log.seek(0)
        output = log.read()
    return ChildRun(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode, output)


def checkout(ref: str, dest: Path) -> Path:
    """The tree of `ref` (files only, no .git) extracted into `dest`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref],
                             check=False, capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {ref} failed: {archive.stderr.decode().strip()} "
                         "(bench.versus needs a clone with the repository's history; pass --ref to choose another)")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def metric_table(output: str) -> str:
    """The metric table `oppu run` prints last (from its `metric` header line to the end)."""
    lines = output.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("metric")]
    return "\n".join(lines[starts[-1]:]) if starts else "(no metric table: see the output above)"


def run_command(args, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "oppu", "run", "--task", args.task, "--users", str(args.users),
            "--methods", args.methods, "--no-adapt", "--quiet",
            "--db", str(workdir / "runs.duckdb"), "--artifacts", str(workdir / "artifacts")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default=BASELINE_REF, help=f"the older version (default {BASELINE_REF})")
    parser.add_argument("--task", default="LaMP_2M")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--methods", default="none,rag,oppu,oppu+rag")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each version, order alternating")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to docs/bench-log/")
    args = parser.parse_args(argv)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPPU_MODEL_CACHE": str(MODEL_CACHE)}
    env.pop("OPPU_AUTO_DTYPE", None)  # each version's own `auto`, as a user gets it
    best: dict[str, ChildRun] = {}
    with tempfile.TemporaryDirectory(prefix="oppu-bench-versus-") as tmp:
        trees = {f"{args.ref} (then)": checkout(args.ref, Path(tmp) / "then"), "working tree (now)": ROOT}
        names = list(trees)
        for i, (r, name) in enumerate(alternating(names, args.rounds)):
            command = run_command(args, Path(tmp) / f"run-{i}")
            print(f"  {name}, round {r + 1}: {' '.join(command[1:])}", flush=True)
            run = timed_child(command, trees[name], {**env, "PYTHONPATH": str(trees[name])})
            if run.returncode != 0:
                print(run.output[-4000:])
                raise SystemExit(f"{name} exited with {run.returncode}")
            print(f"    {run.seconds:.1f} s wall, {run.cpu_seconds:.1f} s CPU, peak RSS {run.peak_mib:.0f} MiB",
                  flush=True)
            if name not in best or run.seconds < best[name].seconds:
                best[name] = run
    then, now = (best[n] for n in names)
    rows = [{"version": name, "wall s": run.seconds, "CPU s": run.cpu_seconds, "peak RSS MiB": run.peak_mib,
             "speed-up (wall)": then.seconds / run.seconds, "speed-up (CPU)": then.cpu_seconds / run.cpu_seconds}
            for name, run in best.items()]
    speedup = then.seconds / now.seconds
    notes = [
        (f"command (each version in its own process, own defaults): `oppu run --task {args.task} --users "
         f"{args.users} --methods {args.methods} --no-adapt`; times include the process start, the model load, "
         "training, answering and the store"),
        (f"now vs {args.ref}: {speedup:.2f}x wall, {then.cpu_seconds / now.cpu_seconds:.2f}x CPU: "
         + verdict(speedup, TARGET_SPEEDUP)),
        f"each version ran {args.rounds} time(s), order alternating; the fastest is reported",
        *[f"{name} metrics:\n\n```\n{metric_table(run.output)}\n```\n" for name, run in best.items()],
    ]
    append_report(f"The same run then and now: {args.ref} against the working tree", markdown_table(rows), notes,
                  write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
