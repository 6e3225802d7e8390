"""The Playground page in a real headless Chromium: `streamlit run dashboard/app.py` on a free loopback port over a
tiny run (tiny model, tiny data, personal adapters on disk); a query is typed into the page, the button clicked,
and the four methods' answers (non-personalized, RAG, OPPU, OPPU+RAG) appear side by side, each naming the model
that answered. A screenshot goes to artifacts/screenshots/playground.png (git-ignored).
Needs Debian's `chromium` and `chromium-driver` (`make system-deps`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
from test_serve_support import tiny_run

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    REASON = ("BROWSER TESTS SKIPPED: chromium or chromedriver is not installed. Install Debian's `chromium` and "
              "`chromium-driver` (`make system-deps`, as root) — CI does.")
    warnings.warn(REASON, stacklevel=1)
    pytestmark = [pytest.mark.browser, pytest.mark.skip(reason=REASON)]

LABELS = ["Non-personalized", "RAG", "OPPU", "OPPU+RAG"]
QUERY = "Which tag does this movie relate to? space ship love city dragon war"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("play-browser")
    cfg, run_id = tiny_run(tiny_model_dir, tiny_data_dir, root, users=1)
    env = {**os.environ, "OPPU_DATA": str(tiny_data_dir), "OPPU_DB": cfg.db, "OPPU_ARTIFACTS": cfg.artifacts_dir,
           "OPPU_JOBS": str(root / "jobs"), "OPPU_MODEL": str(tiny_model_dir), "HF_HUB_OFFLINE": "1"}
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"streamlit did not answer at {url} within 90 s") from None
                time.sleep(0.5)
        yield url, run_id
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1400", "--hide-scrollbars",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _idle(driver, timeout: float = 90) -> None:
    """Wait until the script has finished running (the "running" status widget is gone)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    time.sleep(0.5)
    WebDriverWait(driver, timeout).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'))


def test_a_typed_query_gets_four_answers_side_by_side(app_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, run_id = app_url
    wait = WebDriverWait(browser, 90)
    browser.get(f"{url}/playground")
    try:
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "h1"), "Playground"))
        _idle(browser)
        wait.until(ec.element_to_be_clickable((By.XPATH, "//label[.//p[text()='My own input']]"))).click()
        box = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, '[data-testid="stTextArea"] textarea')))
        box.send_keys(QUERY)
        box.send_keys(Keys.CONTROL, Keys.ENTER)  # commits the text area's value to the script
        _idle(browser)
        browser.find_element(By.XPATH, "//button[.//p[text()='Answer side by side']]").click()
        wait.until(lambda d: [h.text for h in d.find_elements(By.CSS_SELECTOR, '[data-testid="stColumn"] h3')]
                   == LABELS)
        _idle(browser)
    except Exception:
        SHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SHOTS / "playground-failure.png"))
        raise
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert browser.find_element(By.CSS_SELECTOR, '[data-testid="stTextArea"] textarea').get_attribute(
        "value") == QUERY
    columns = [c for c in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stColumn"]')
               if c.find_elements(By.TAG_NAME, "h3")]
    assert len(columns) == 4
    for label, column in zip(LABELS, columns, strict=True):
        answer = column.find_elements(By.CSS_SELECTOR, "strong")
        assert answer and answer[0].text.strip(), f"{label}: no answer shown"
        assert "model " in column.text, f"{label}: the answering model is not named"
    assert sum(f"{run_id}/" in c.text for c in columns) == 2  # OPPU and OPPU+RAG answer with the user's adapters
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / "playground.png"))
