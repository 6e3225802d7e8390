"""The quick demo as a new user meets it, in a real headless Chromium on the embedded model: click the Overview
button, the job runs, and Compare shows a run in which at least two methods answer differently.

This is the flow `python -m bench.quick_demo` times (click to result); here nothing is timed. The task-adapted bases
are prepared first, as `make demo` does with `oppu prepare`.
"""

from __future__ import annotations

import pytest
from browser_support import ROOT, browser_marks, chromium, dashboard

pytestmark = [*browser_marks(), pytest.mark.slow]


def test_quick_demo_from_the_overview_button_shows_methods_that_differ(tmp_path):
    import subprocess
    import sys

    from bench.quick_demo import click_quick_demo, compare_differences, dashboard_env, wait_for_job
    from oppu.store import Store

    artifacts = tmp_path / "artifacts"
    env = dashboard_env(tmp_path, artifacts)
    # As a user has it: `dtype=auto` as measured on this CPU (the suite's float32 pin is for its exactness checks,
    # not for this flow), and the bases built by `oppu prepare` in the same environment as the dashboard.
    env.pop("OPPU_AUTO_DTYPE", None)
    subprocess.run([sys.executable, "-m", "oppu", "prepare", "--data", env["OPPU_DATA"], "--artifacts",
                    str(artifacts)], env=env, check=True, cwd=ROOT, capture_output=True)
    with dashboard(env) as url, chromium(tmp_path / "chromium") as driver:
        click_quick_demo(driver, url)
        job = wait_for_job(tmp_path / "jobs", timeout=1200)
        assert job["state"] == "done", job.get("error")
        assert job["config"]["task"] == "LaMP_2M" and job["config"]["tag"] == "quick-demo"
        shown = compare_differences(driver, url)
    # every pair the page compares is on screen, and some pair of methods disagrees on at least one query
    assert {(d["a"], d["b"]) for d in shown} >= {("OPPU", "Non-personalized"), ("OPPU+RAG", "RAG")}
    assert any(d["wins"] + d["losses"] > 0 for d in shown), shown
    # what the page showed is what the store holds: two methods' scores differ on some query
    scores = Store(tmp_path / "oppu.duckdb").scores([job["run_id"]])
    per_query = scores.pivot_table(index=["user_id", "query_id"], columns="method", values="score")
    assert (per_query.nunique(axis=1) > 1).any()
