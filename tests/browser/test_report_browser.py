"""The HTML of `oppu report --preset tiny` (tiny model, tiny data) opened from disk in a headless Chromium with
the network off: every figure renders (plotly.js is inlined), every error bar is drawn, and the page raises no
JavaScript error. A screenshot goes to artifacts/screenshots/report.png (git-ignored).
Needs Debian's `chromium` and `chromium-driver` (`make system-deps`)."""

from __future__ import annotations

import re

import pytest
from browser_support import SHOTS, browser_marks, chromium

pytestmark = browser_marks()


@pytest.fixture(scope="module")
def report_file(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    import oppu.profiles
    from oppu.report import build_report

    tmp = tmp_path_factory.mktemp("report")
    keep = oppu.profiles.PROFILE_MAX_NEW_TOKENS
    oppu.profiles.PROFILE_MAX_NEW_TOKENS = 4  # the tiny random model never ends a turn
    try:
        return build_report("tiny", tmp / "report.html",
                            {"model.name": str(tiny_model_dir), "model.device": "cpu", "data_dir": str(tiny_data_dir),
                             "db": str(tmp / "r.duckdb"), "artifacts_dir": str(tmp / "art")},
                            command="oppu report --preset tiny", progress=False, log=lambda line: None)
    finally:
        oppu.profiles.PROFILE_MAX_NEW_TOKENS = keep


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    # --proxy-server to nowhere: the report must render with no network at all
    with chromium(tmp_path_factory.mktemp("chromium-profile"), window="1300,1400", browser_log=True,
                  extra_flags=("--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>")) as driver:
        yield driver


def test_every_figure_of_the_report_renders_offline(report_file, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = re.findall(r'<div id="(fig-[^"]+)"', report_file.read_text())
    assert len(expected) == 5
    browser.get(report_file.resolve().as_uri())
    WebDriverWait(browser, 60).until(
        lambda d: all(d.execute_script(
            "const el = document.getElementById(arguments[0]);"
            "return !!(el && el._fullLayout && el.querySelector('svg.main-svg'));", fig) for fig in expected))
    for fig in expected:
        drawn = browser.execute_script(
            "const el = document.getElementById(arguments[0]);"
            "return {traces: el.data.length, marks: el.querySelectorAll('.point, .bars path').length,"
            "        errorbars: el.querySelectorAll('g.errorbar').length, title: el._fullLayout.title.text};", fig)
        assert drawn["traces"] >= 1 and drawn["marks"] >= 1, (fig, drawn)
        assert drawn["errorbars"] >= 1, (fig, drawn)  # every figure shows its intervals
    assert browser.find_element(By.CSS_SELECTOR, "h1").text.startswith("OPPU report")
    for section in ("main", "activity", "k", "behaviour-shift", "history-format", "peft", "provenance"):
        assert browser.find_element(By.ID, section).is_displayed()
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    shots = SHOTS
    shots.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shots / "report.png"))
