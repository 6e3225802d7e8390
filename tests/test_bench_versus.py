"""`bench.versus`: what it measures of each run is the child's own (kernel accounting), the older tree is the
ref's, and the metric table it quotes is the one `oppu run` printed last."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.common import ROOT
from bench.versus import checkout, metric_table, timed_child

BURN = """
import sys, time
block = b"x" * (200 * 2**20)  # written, so its pages are resident
while time.process_time() < 0.3:
    pass
print("done", len(block))
sys.exit(3)
"""


def test_a_child_is_measured_by_its_own_cpu_time_and_peak_memory(tmp_path):
    run = timed_child([sys.executable, "-c", BURN], tmp_path, dict(os.environ))
    assert run.returncode == 3
    assert run.output.startswith("done")
    assert run.cpu_seconds >= 0.3  # the child spun until its own clock said so
    assert run.peak_mib >= 200  # the 200 MiB it wrote, whatever the interpreter itself takes
    assert run.seconds >= run.cpu_seconds / (os.cpu_count() or 1)


def test_the_older_tree_is_the_refs_files(tmp_path):
    tree = checkout("HEAD", tmp_path / "then")
    committed = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:pyproject.toml"], capture_output=True,
                               check=True).stdout
    assert (tree / "pyproject.toml").read_bytes() == committed
    assert not (tree / ".git").exists()


def test_an_unknown_ref_says_what_is_needed(tmp_path):
    with pytest.raises(SystemExit, match="--ref"):
        checkout("no-such-ref-anywhere", tmp_path / "then")


def test_the_quoted_table_is_the_last_one_printed():
    output = "metric noise\nearlier\nrun X done\nmetric  accuracy\nmethod\nnone      0.5000\n"
    assert metric_table(output) == "metric  accuracy\nmethod\nnone      0.5000"
    assert "no metric table" in metric_table("Traceback: boom")


def test_rounds_alternate_so_no_path_always_runs_first():
    from bench.common import alternating

    assert list(alternating(["then", "now"], 3)) == [(0, "then"), (0, "now"), (1, "now"), (1, "then"),
                                                     (2, "then"), (2, "now")]
