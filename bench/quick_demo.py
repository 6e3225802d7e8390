"""Click-to-result of the dashboard's quick demo, in a real headless Chromium, on this machine.

    python -m bench.quick_demo              # target: the first comparison on screen within 90 s of the click

As a new user meets it after `make demo`: `oppu prepare` has built the quick demo's task-adapted bases (done here
first, untimed, into the same runs/artifacts folder), the dashboard runs on the demo data with an empty store, the
Overview page is open. The script clicks "Run the quick demo experiment", waits for the job to finish, opens
Compare, and stops the clock when Compare shows the run's paired differences. It prints click -> job done ->
Compare rendered, each method's mean, every paired difference on screen (OPPU vs the non-personalized base,
OPPU+RAG vs RAG: the directions the paper reports) and MET/MISSED, and appends them to docs/bench-log/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import DEMO_DATA, ROOT, append_report, machine_info, markdown_table, verdict

TARGET_S = 90.0
BUTTON = "Run the quick demo experiment"
DIFFERENCE = re.compile(r"^(?P<a>.+?) vs (?P<b>.+?): (?P<diff>[+-]\d+\.\d+) \[(?P<lo>[+-]\d+\.\d+), "
                        r"(?P<hi>[+-]\d+\.\d+)\].*wins/ties/losses (?P<w>\d+)/(?P<t>\d+)/(?P<l>\d+)", re.MULTILINE)


def click_quick_demo(driver, url: str, timeout: float = 60) -> float:
    """Open Overview, click the quick demo button; returns the monotonic time of the click once Streamlit has
    confirmed the submission."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    button = wait.until(ec.element_to_be_clickable((By.XPATH, f"//button[contains(., '{BUTTON}')]")))
    clicked = time.monotonic()
    button.click()
    wait.until(lambda d: "Submitted job" in d.find_element(By.TAG_NAME, "body").text)
    return clicked


def wait_for_job(jobs_root: Path, timeout: float) -> dict[str, Any]:
    """The only job of `jobs_root`, once it reaches a final state (reads job.json; no page reloads that would
    take CPU from the job)."""
    from oppu import jobs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = jobs.list_jobs(jobs_root)
        if found and found[0].get("state") in jobs.FINAL_STATES:
            return found[0]
        time.sleep(0.5)
    raise TimeoutError(f"the quick demo job did not finish within {timeout:.0f} s (see {jobs_root})")


def compare_differences(driver, url: str, timeout: float = 120) -> list[dict[str, Any]]:
    """Open Compare and wait until it shows the run's paired differences; returns them as read from the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/compare")
    body = lambda d: d.find_element(By.TAG_NAME, "body").text
    WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: DIFFERENCE.search(body(d)))
    return [{"a": m["a"].strip("- "), "b": m["b"], "diff": float(m["diff"]), "ci": (float(m["lo"]), float(m["hi"])),
             "wins": int(m["w"]), "ties": int(m["t"]), "losses": int(m["l"])}
            for m in DIFFERENCE.finditer(body(driver))]


def dashboard_env(tmp: Path, artifacts: Path, data: Path = DEMO_DATA) -> dict[str, str]:
    return {**os.environ, "OPPU_DATA": str(data), "OPPU_DB": str(tmp / "oppu.duckdb"),
            "OPPU_JOBS": str(tmp / "jobs"), "OPPU_ARTIFACTS": str(artifacts), "HF_HUB_OFFLINE": "1"}


def measure(artifacts: Path, keep: Path | None = None) -> dict[str, Any]:
    from bench.browser import chromium, dashboard
    from oppu.config import RunConfig, build_config
    from oppu.experiment import prepare_bases
    from oppu.store import Store

    started = time.perf_counter()
    prepared = prepare_bases(build_config("quick", {"task": RunConfig().task, "data_dir": str(DEMO_DATA),
                                                    "artifacts_dir": str(artifacts)}))
    prepare_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="quick-demo-") as scratch:
        tmp = keep or Path(scratch)
        env = dashboard_env(tmp, artifacts)
        with dashboard(env) as url, chromium(tmp / "chromium") as driver:
            clicked = click_quick_demo(driver, url)
            job = wait_for_job(tmp / "jobs", timeout=1800)
            done = time.monotonic()
            if job["state"] != "done":
                raise RuntimeError(f"the quick demo job ended {job['state']}: {job.get('error')}")
            differences = compare_differences(driver, url)
            shown = time.monotonic()
        store = Store(tmp / "oppu.duckdb")
        metrics = store.run_metrics(job["run_id"])
    return {"prepare_s": prepare_s, "bases_cached": all(r.cached for r in prepared.values()),
            "job_s": done - clicked, "shown_s": shown - clicked, "differences": differences,
            "metrics": metrics.to_dict("records"), "run_id": job["run_id"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default=str(ROOT / "runs" / "artifacts"),
                        help="where the task-adapted bases are prepared and read (default runs/artifacts, as "
                             "`make demo`)")
    parser.add_argument("--keep", help="keep the store, jobs and worker log in this folder")
    parser.add_argument("--no-log", action="store_true", help="print only; do not append to docs/bench-log/")
    args = parser.parse_args(argv)
    keep = Path(args.keep) if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    result = measure(Path(args.artifacts), keep)
    rows = [{"step": "task-adapted bases (oppu prepare, before the click)",
             "seconds": f"{result['prepare_s']:.1f}" + (" (cached)" if result["bases_cached"] else "")},
            {"step": "click -> job done", "seconds": f"{result['job_s']:.1f}"},
            {"step": "click -> Compare shows the paired differences", "seconds": f"{result['shown_s']:.1f}",
             "target": f"{TARGET_S:.0f} s", "verdict": verdict(result["shown_s"], TARGET_S, higher_is_better=False)}]
    table = markdown_table(rows)
    notes = [f"run {result['run_id']}; machine: {json.dumps(machine_info())}"]
    notes += [f"{d['a']} vs {d['b']}: {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], "
              f"wins/ties/losses {d['wins']}/{d['ties']}/{d['losses']}" for d in result["differences"]]
    notes += [f"{m['method']} {m['metric']} {m['value']:.3f}" for m in result["metrics"]
              if not m["metric"].startswith("lenient_")]
    print(table)
    for note in notes:
        print(note)
    append_report("Quick demo: click to result in the browser", table, notes, write=not args.no_log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
