"""The dashboard in a real headless Chromium: `streamlit run dashboard/app.py` on a free loopback port, pointed at
a tmp store filled with synthetic results over the demo data, every page opened and checked for its content.

Screenshots go to artifacts/screenshots/ (git-ignored); with OPPU_UPDATE_SCREENSHOTS=1 Compare and Analyses are copied, downscaled, to
docs/screenshots/ for the README. Needs Debian's `chromium` and `chromium-driver` (`make system-deps`).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from browser_support import ROOT, SHOTS, browser_marks, chromium, dashboard

README_SHOTS = ROOT / "docs" / "screenshots"
TASK = "LaMP_2M"
METHODS = ("none", "rag", "oppu", "oppu+rag")
# Synthetic accuracy per method (rising with history size for OPPU, as the paper's Fig. 3 reports), so the
# figures have a recognisable shape. These are fixtures, not results.
BASE_ACCURACY = {"none": 0.25, "rag": 0.45, "oppu": 0.4, "oppu+rag": 0.55}

pytestmark = browser_marks()


def _accuracy(method: str, history_size: int, k: int, peft: str, history_format: str, cutoff) -> float:
    acc = BASE_ACCURACY[method]
    if method.startswith("oppu"):
        acc += 0.08 * min(history_size, 120) / 40 - {"lora": 0, "ia3": 0.05, "prompt": 0.1}[peft]
        acc -= 0.1 if cutoff else 0
    if "rag" in method:
        acc += 0.03 * min(k, 4) - (0.08 if history_format == "text_only" else 0)
    return min(max(acc, 0.05), 0.95)


def populate(db: Path, data_dir: Path) -> None:
    """Runs of the k, PEFT, history-format and behaviour-shift sweeps over the demo data's 10 most active users."""
    from oppu.data import load_task_data
    from oppu.store import Store
    from oppu.tasks import get_task

    data, labels = load_task_data(data_dir, TASK), get_task(TASK).labels
    users = data.most_active(10)
    store = Store(db)
    def setting(k=1, peft="lora", history_format="full", cutoff=None):
        return {"k": k, "peft": peft, "history_format": history_format, "cutoff": cutoff}

    settings = [setting(k=k) for k in (1, 2, 4, 8)] + [setting(peft=p) for p in ("ia3", "prompt")]
    settings += [setting(history_format="text_only"), setting(cutoff="2021-01-01")]
    for n, s in enumerate(settings):
        run_id = f"demo-{n:02d}-k{s['k']}-{s['peft']}"
        config = {"task": TASK, "methods": list(METHODS), "retrieval": {"k": s["k"], "retriever": "bm25"},
                  "user_peft": {"kind": s["peft"]}, "history_format": s["history_format"],
                  "history_cutoff": s["cutoff"]}
        store.create_run(run_id, config, task=TASK, model="synthetic", data_fingerprint=data.fingerprint,
                         code_version="browser-test", tag="browser-test")
        rng = random.Random(n)
        rows = []
        for user in users:
            for q in user.queries:
                for method in METHODS:
                    right = rng.random() < _accuracy(method, len(user.history), s["k"], s["peft"],
                                                     s["history_format"], s["cutoff"])
                    output = q.gold if right else rng.choice([lab for lab in labels if lab != q.gold])
                    k = s["k"] if "rag" in method else 0
                    items = user.history[:k]
                    rows.append({"run_id": run_id, "task": TASK, "user_id": user.id, "query_id": q.id,
                                 "method": method, "k": k, "peft": s["peft"], "retriever": "bm25",
                                 "prompt": q.input, "raw_output": output, "output": output, "gold": q.gold,
                                 "retrieved_ids": [i.id for i in items],
                                 "retrieved_scores": sorted((round(rng.uniform(2, 12), 2) for _ in items),
                                                            reverse=True),
                                 "history_size": len(user.history), "correct": float(right)})
            store.add_train_curve(run_id, user.id, "user", [(step, 2.5 / step) for step in range(1, 9)])
        store.add_predictions(rows)
        store.finish_run(run_id, {m: {"accuracy": BASE_ACCURACY[m]} for m in METHODS})


def fake_adapters(artifacts: Path, data_dir: Path) -> None:
    """Adapter folders (manifest + placeholder weights) in the layout `oppu.experiment` writes, for two users."""
    import json

    from oppu.data import load_task_data

    for user in load_task_data(data_dir, TASK).most_active(2):
        for style, methods in (("plain", ["oppu"]), ("rag-k1", ["oppu+rag"])):
            folder = artifacts / "adapters" / TASK / "demo-00-k1-lora" / user.id / style
            folder.mkdir(parents=True)
            (folder / "adapter_model.safetensors").write_bytes(b"\0" * 37_000)
            (folder / "adapter_config.json").write_text("{}")
            (folder / "manifest.json").write_text(json.dumps({
                "user_id": user.id, "task": TASK, "run_id": "demo-00-k1-lora", "style": style, "methods": methods,
                "peft": {"kind": "lora", "r": 8, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "item_count": len(user.history), "final_loss": 0.42, "created": "2024-05-01T12:00:00Z"}))


@pytest.fixture(scope="module")
def app_folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    return {"OPPU_DATA": ROOT / "data" / "demo", "OPPU_DB": tmp / "oppu.duckdb", "OPPU_JOBS": tmp / "jobs",
            "OPPU_ARTIFACTS": tmp / "artifacts"}


@pytest.fixture(scope="module")
def app_url(app_folders):
    tmp = app_folders["OPPU_DB"].parent
    data_dir = ROOT / "data" / "demo"
    env = {**os.environ, "OPPU_DATA": str(data_dir), "OPPU_DB": str(tmp / "oppu.duckdb"),
           "OPPU_JOBS": str(tmp / "jobs"), "OPPU_ARTIFACTS": str(tmp / "artifacts"), "HF_HUB_OFFLINE": "1"}
    populate(tmp / "oppu.duckdb", data_dir)
    fake_adapters(tmp / "artifacts", data_dir)
    with dashboard(env) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile"), window="1400,1500") as driver:
        yield driver


def _open(driver, url: str, heading: str, wait_for: tuple[str, ...] = (), timeout: float = 60):
    """Open a page, wait for its heading and the CSS selectors in `wait_for`, and for Streamlit to go idle."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    step = f"heading {heading!r}"
    try:
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "h1"), heading))
        for selector in wait_for:
            step = f"element {selector}"
            wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, selector)))
        # the script has finished when the "running" status widget is gone
        step = "the app to finish running"
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'))
    except Exception as exc:
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / "failure.png"))
        raise AssertionError(f"{url}: waited {timeout:.0f} s for {step}; see {SHOTS / 'failure.png'}") from exc
    time.sleep(1.0)  # let plotly finish drawing before a screenshot
    assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'), f"traceback on {url}"
    return driver


def _shot(driver, name: str, readme: bool = False) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    if readme:  # fit the window to the page's content so the README image has no empty band
        height = driver.execute_script(
            "const m = document.querySelector('[data-testid=\"stMainBlockContainer\"]');"
            "return m ? Math.ceil(m.getBoundingClientRect().bottom) : 1500;")
        driver.set_window_size(1400, min(max(height + 40, 700), 2600))
        time.sleep(1.0)
    driver.save_screenshot(str(path))
    if readme:
        driver.set_window_size(1400, 1500)
    # README copies are refreshed only on request, so an ordinary test run leaves the tracked files untouched.
    if readme and os.environ.get("OPPU_UPDATE_SCREENSHOTS") == "1":
        from PIL import Image

        README_SHOTS.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            width = 1100
            small = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
            small.convert("P", palette=Image.ADAPTIVE, colors=256).save(README_SHOTS / f"{name}.png",
                                                                         optimize=True)
    return path


def test_overview(app_url, browser):
    from selenium.webdriver.common.by import By

    _open(browser, app_url, "OPPU Studio", ('[data-testid="stDataFrame"]', ".js-plotly-plot"))
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "One PEFT Per User" in body and "Run the quick demo experiment" in body
    nav = browser.find_element(By.CSS_SELECTOR, '[data-testid="stSidebarNav"]').text
    for title in ("Overview", "Data explorer", "Train", "Compare", "Analyses", "Adapters"):
        assert title in nav
    _shot(browser, "overview")


def test_data_explorer(app_url, browser):
    from selenium.webdriver.common.by import By

    _open(browser, f"{app_url}/data_explorer?task={TASK}", "Data explorer",
          (".js-plotly-plot", '[data-testid="stDataFrame"]'))
    assert "History size across users" in browser.find_element(By.CSS_SELECTOR, ".js-plotly-plot").text
    _shot(browser, "data_explorer")


def test_train(app_url, browser):
    from selenium.webdriver.common.by import By

    _open(browser, f"{app_url}/train", "Train personal adapters", ('[data-testid="stForm"]',))
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Submit training job" in body and "No jobs yet" in body
    _shot(browser, "train")


def test_compare(app_url, browser):
    from selenium.webdriver.common.by import By

    _open(browser, f"{app_url}/compare", "Compare methods", ('[data-testid="stDataFrame"]',
                                                             '[data-testid="stMetric"]'))
    metrics = browser.find_element(By.CSS_SELECTOR, '[data-testid="stHorizontalBlock"] [data-testid="stMetric"]')
    assert "OPPU" in metrics.text
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Side by side" in body and "Inputs and retrieved items" in body
    _shot(browser, "compare", readme=True)


def test_analyses(app_url, browser):
    from selenium.webdriver.common.by import By

    _open(browser, f"{app_url}/analyses", "Analyses", (".js-plotly-plot",))
    plot = browser.find_element(By.CSS_SELECTOR, ".js-plotly-plot")
    assert "Performance by user activity" in plot.text and "OPPU" in plot.text
    assert browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .trace")
    _shot(browser, "analyses", readme=True)


def test_train_progress_refreshes_live(app_url, app_folders, browser, tiny_model_dir):
    """A real job (tiny model) submitted while the Train page is open: the page shows its progress and then
    its outcome without a reload — the st.fragment(run_every=2) polling at work."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from oppu import jobs
    from oppu.config import ModelConfig, RunConfig, TrainConfig

    _open(browser, f"{app_url}/train", "Train personal adapters", ('[data-testid="stForm"]',))
    cfg = RunConfig(task=TASK, users=1, methods=("none", "oppu"), data_dir=str(app_folders["OPPU_DATA"]),
                    db=str(app_folders["OPPU_DB"]), artifacts_dir=str(app_folders["OPPU_ARTIFACTS"]),
                    model=ModelConfig(name=str(tiny_model_dir)), task_adaptation=False,
                    user_train=TrainConfig(epochs=1, batch_size=4, max_length=64, max_examples=8), tag="live")
    job_id = jobs.submit(cfg, app_folders["OPPU_JOBS"])
    wait = WebDriverWait(browser, 120, poll_frequency=0.25)
    wait.until(lambda d: job_id in d.find_element(By.TAG_NAME, "body").text)  # appeared with no reload
    wait.until(lambda d: f"Job {job_id} finished" in d.find_element(By.TAG_NAME, "body").text)
    assert jobs.get_job(app_folders["OPPU_JOBS"], job_id)["state"] == "done"
    _shot(browser, "train_after_job")


def test_adapters(app_url, browser):
    from selenium.webdriver.common.by import By

    _open(browser, f"{app_url}/adapters", "Personal adapters", ('[data-testid="stDataFrame"]',))
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Export as zip" in body and "Delete" in body
    _shot(browser, "adapters")
