"""The Playground page in a real headless Chromium: `streamlit run dashboard/app.py` on a free loopback port over a
tiny run (tiny model, tiny data, personal adapters on disk); a query is typed into the page, the button clicked,
and the four methods' answers (non-personalized, RAG, OPPU, OPPU+RAG) appear side by side, each naming the model
that answered. A screenshot goes to artifacts/screenshots/playground.png (git-ignored).
Needs Debian's `chromium` and `chromium-driver` (`make system-deps`)."""

from __future__ import annotations

import os
import time

import pytest
from browser_support import SHOTS, browser_marks, chromium, dashboard
from test_serve_support import tiny_run

pytestmark = browser_marks()

LABELS = ["Non-personalized", "RAG", "OPPU", "OPPU+RAG"]
QUERY = "Which tag does this movie relate to? space ship love city dragon war"


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("play-browser")
    cfg, run_id = tiny_run(tiny_model_dir, tiny_data_dir, root, users=1)
    env = {**os.environ, "OPPU_DATA": str(tiny_data_dir), "OPPU_DB": cfg.db, "OPPU_ARTIFACTS": cfg.artifacts_dir,
           "OPPU_JOBS": str(root / "jobs"), "OPPU_MODEL": str(tiny_model_dir), "HF_HUB_OFFLINE": "1"}
    with dashboard(env) as url:
        yield url, run_id


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


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
