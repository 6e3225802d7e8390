"""`python -m bench.reliability_report [--out docs/RELIABILITY.md]`: run the reliability suite, write its table.

It runs `pytest tests/reliability` once with `--junitxml`, then counts, per category (one test file each), the
cases tried, how many survived (passed), how many show a known, reported bug (strict xfail) and how many failed,
with the time each category took. The sizes of the attack tables (malformed inputs, hostile ids, malicious zips,
crash points, concurrent writers) are read from the test modules themselves, so the document can never claim
more than the suite tried. Nothing here is written by hand: rerun it after the suite changes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = "tests/reliability"

# test file -> (category, what it attacks)
CATEGORIES: dict[str, tuple[str, str]] = {
    "test_bad_inputs": ("malformed input", ("readers, `oppu data validate`, `oppu run`, `oppu jobs submit`, "
                                           "`oppu evaluate`")),
    "test_fuzz_inputs": ("fuzzed input", "random bytes / JSON into readers, metrics, prompts, paths (hypothesis)"),
    "test_hostile_ids": ("hostile identifiers", "user ids, job ids, adapter zips with traversal entries"),
    "test_safe_loading_and_exposure": ("safe loading & exposure", ("pickle scan, safetensors-only artifacts, "
                                                                  "loopback binding, secrets and home paths")),
    "test_crashes": ("crashes & full disk", "kill -9 in adaptation / training / generation, ENOSPC"),
    "test_concurrency": ("concurrent writers", "writer processes and a polling reader on one store"),
    "test_serving_load": ("serving", "concurrent clients against `oppu serve`, SIGKILL mid-stream"),
}
KEPT_SECTION = "## Serving under load"
"""Sections from this heading on are written by `python -m bench.serving_soak` runs, not by this script: a
rewrite keeps them."""


def attack_sizes() -> dict[str, int]:
    """How many distinct hostile things each table holds (read from the test modules)."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from reliability import conftest, test_bad_inputs, test_crashes, test_hostile_ids

    return {
        "malformed data files": len(test_bad_inputs.DATA_CASES),
        "bad command-line options": len(test_bad_inputs.OPTION_CASES),
        "bad predictions/golds pairs": len(test_bad_inputs.EVAL_CASES),
        "hostile user ids (through a real run)": len(conftest.HOSTILE_USERS),
        "hostile job ids (through the CLI)": len(test_hostile_ids.HOSTILE_JOB_IDS),
        "malicious adapter zips": len(test_hostile_ids.MALICIOUS_ZIPS),
        "kill -9 points in one job": len(test_crashes.KILL_POINTS),
        "concurrent writer processes": 3,
    }


def run_suite(junit: Path, extra: list[str]) -> tuple[int, float]:
    started = time.perf_counter()
    proc = subprocess.run(check=False, args=[sys.executable, "-m", "pytest", SUITE, "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", *extra], cwd=ROOT)
    return proc.returncode, time.perf_counter() - started


def tally(junit: Path) -> dict[str, dict[str, float]]:
    """category -> {tried, survived, known_bug, failed, seconds} from a junit XML report."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        category = CATEGORIES.get(module, (module, ""))[0]
        row = out[category]
        row["tried"] += 1
        row["seconds"] += float(case.get("time") or 0)
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            row["failed"] += 1
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            row["known_bug"] += 1
        elif skipped is not None:
            row["skipped"] += 1
        else:
            row["survived"] += 1
    return out


def render(rows: dict[str, dict[str, float]], sizes: dict[str, int], rc: int, wall: float) -> str:
    lines = ["# Reliability", "",
             ("Produced by `python -m bench.reliability_report`, which runs `pytest tests/reliability` once and "
             "counts its junit report. Do not edit by hand."), "",
             (f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, suite wall time {wall:.0f} s, "
             f"pytest exit status {rc}."), "",
             ("| category | what is attacked | cases tried | survived | known bug (reported, strict xfail) | "
             "failed | time (s) |"), "|---|---|---:|---:|---:|---:|---:|"]
    described = {c: d for c, d in CATEGORIES.values()}
    for category in [c for c, _ in CATEGORIES.values()] + sorted(set(rows) - set(described)):
        row = rows.get(category)
        if not row:
            continue
        lines.append(f"| {category} | {described.get(category, '')} | {int(row['tried'])} | "
                     f"{int(row['survived'])} | {int(row['known_bug'])} | {int(row['failed'])} | "
                     f"{row['seconds']:.0f} |")
    total = {k: sum(r.get(k, 0) for r in rows.values()) for k in ("tried", "survived", "known_bug", "failed")}
    lines.append(f"| **all** | | {int(total['tried'])} | {int(total['survived'])} | {int(total['known_bug'])} | "
                 f"{int(total['failed'])} | {wall:.0f} |")
    lines += ["", "## What the tables hold", "", "| attack table | size |", "|---|---:|"]
    lines += [f"| {name} | {size} |" for name, size in sizes.items()]
    lines += ["", ("A case is one (input, entry point) pair, so one malformed file counts once per entry point "
              "(reader, `oppu data validate`, and `oppu run` for files that cannot be used at all)."), "",
              ("\"Survived\" means: a one-line message naming the file or record and the fix, a non-zero CLI "
              "exit, no traceback, and the results store, adapters and jobs folder byte-for-byte unchanged "
              "(or, for crashes, predictions equal to an uninterrupted run). A \"known bug\" row is a strict "
              "xfail whose reason names the file and function; it turns into a failure once the bug is fixed, "
              "so the xfail is removed then."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability_report", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "RELIABILITY.md"), help="markdown file to write")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        rc, wall = run_suite(junit, args.pytest_args)
        if not junit.is_file():
            print(f"pytest wrote no junit report (exit {rc}); nothing to tabulate", file=sys.stderr)
            return rc or 1
        text = render(tally(junit), attack_sizes(), rc, wall)
    out = Path(args.out)
    old = out.read_text() if out.is_file() else ""
    if KEPT_SECTION in old:
        text += "\n" + old[old.index(KEPT_SECTION):]
    out.write_text(text)
    print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
