"""`python -m bench [NAME ...] [--no-report]`: run the benchmarks, each in its own process.

A separate process per benchmark keeps each one's peak RSS its own and leaves no warm state for the next.
Each script appends its section to docs/bench-log/<date>.md unless --no-report is given; run one alone with
`python -m bench.<name> --help` for its options (sizes, rounds). At the end every target's line (its ratio and
MET or MISSED, as the script printed it) is listed again, benchmark by benchmark.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

from bench.common import ROOT

# name -> (module, what it compares, its flag for "print only")
BENCHES: dict[str, tuple[str, str, str]] = {
    "startup": ("bench.startup", "model start from cache vs first GGUF conversion", "--no-report"),
    "generation": ("bench.generation", "32 users x 2 queries: multi-LoRA vs per-user loop vs PEFT adapter_names",
                   "--no-report"),
    "training": ("bench.training", "16 users x 16 items: multi-user batched training vs per-user loop",
                 "--no-report"),
    "e2e": ("bench.e2e", "16 LaMP_2M users end to end: run_experiment (OPPU) vs the official per-user loop",
            "--no-report"),
    "engines": ("bench.engines", "8 LaMP_2M users, one real run: the multi_lora engine vs per_user", "--no-report"),
    "store": ("bench.bench_store", "every dashboard query on 1,000,000 prediction rows", "--no-write"),
}


def _run_and_collect(command: list[str]) -> tuple[int, list[str]]:
    """Run a benchmark, passing its output through, and keep its target lines (`... MET (target ...)`)."""
    lines = []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if re.search(r"\b(MET|MISSED) \(target", line) and not line.startswith("|"):  # not table rows
                lines.append(line.strip().removeprefix("- "))
    return proc.returncode, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Run OPPU Studio's benchmarks.",
                                     epilog="benchmarks: " + "; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()))
    parser.add_argument("names", nargs="*", default=[], metavar="NAME",
                        help=f"which to run (default: all of {', '.join(BENCHES)})")
    parser.add_argument("--no-report", action="store_true", help="do not append to the dated log in docs/bench-log/")
    args = parser.parse_args(argv)
    names = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}: choose from {', '.join(BENCHES)}")
    summary, failed = [], []
    verdicts: dict[str, list[str]] = {}
    for name in names:
        module, _, quiet = BENCHES[name]
        print(f"== {name}: {BENCHES[name][1]}", flush=True)
        started = time.perf_counter()
        code, lines = _run_and_collect([sys.executable, "-m", module, *([quiet] if args.no_report else [])])
        verdicts[name] = lines
        summary.append(f"{name}: {time.perf_counter() - started:.0f} s" + ("" if code == 0 else f" (exit {code})"))
        if code != 0:
            failed.append(name)
    print("== done: " + ", ".join(summary))
    print("== targets")
    for name, lines in verdicts.items():
        for line in lines or ["(no target line printed)"]:
            print(f"{name}: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
