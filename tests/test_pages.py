"""Every dashboard page rendered with Streamlit's AppTest: with an empty store, with a populated one, and driven
through its main interactions (Train form, Compare filters, Adapters delete, bad URL parameters).

AppTest runs one page script per run, so each page file is tested directly and `dashboard/app.py` (the
navigation) separately. The app reads its folders from OPPU_* environment variables, pointed at tmp folders here.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from oppu.config import method_label

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("overview", "data_explorer", "train", "compare", "runs", "analyses", "adapters")
METHODS = ("none", "rag", "oppu", "oppu+rag")
LABELS = {m: method_label(m) for m in METHODS}  # what tables and legends show
RUN_ID = "run-test-0001"


def answer(method: str, gold: str, j: int) -> str:
    """A deterministic answer per method: OPPU always right, RAG right on every other query, `none` never."""
    if method.startswith("oppu") or (method == "rag" and j % 2 == 0):
        return gold
    return "dystopia"


def populate(db: Path, task_data, run_id: str = RUN_ID, k: int = 1, peft: str = "lora",
             history_format: str = "full", cutoff: str | None = None) -> None:
    """One finished run over the tiny data's test users, written through the Store API."""
    from oppu.store import Store

    store = Store(db)
    config = {"task": "LaMP_2M", "methods": list(METHODS), "retrieval": {"k": k, "retriever": "bm25"},
              "user_peft": {"kind": peft}, "history_format": history_format, "history_cutoff": cutoff}
    store.create_run(run_id, config, task="LaMP_2M", model="tiny", data_fingerprint="f", code_version="test",
                     tag="test")
    rows = []
    for user in task_data.test_users:
        for j, q in enumerate(user.queries):
            for method in METHODS:
                output = answer(method, q.gold, j)
                uses_rag = "rag" in method
                rows.append({"run_id": run_id, "task": "LaMP_2M", "user_id": user.id, "query_id": q.id,
                             "method": method, "k": k if uses_rag else 0, "peft": peft, "retriever": "bm25",
                             "prompt": f"prompt of {q.id}", "raw_output": output, "output": output,
                             "gold": q.gold, "retrieved_ids": [user.history[0].id] if uses_rag else [],
                             "retrieved_scores": [1.5] if uses_rag else [], "history_size": len(user.history),
                             "correct": float(output == q.gold)})
        store.add_train_curve(run_id, user.id, "user", [(1, 2.0), (2, 1.2)])
    store.add_predictions(rows)
    store.finish_run(run_id, {m: {"accuracy": 0.5, "f1": 0.4} for m in METHODS})


def page(name: str, **query_params) -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / f"{name}.py"), default_timeout=60)
    at.query_params.update(query_params)
    return at.run()


def texts(at: AppTest) -> str:
    """Every visible text of a rendered page, for content assertions."""
    parts = [e.value for kind in ("title", "subheader", "markdown", "caption", "info", "warning", "error",
                                  "success") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def plotly_charts(at: AppTest) -> list:
    """The page's plotly figures as Figures."""
    import plotly.io

    return [plotly.io.from_json(e.proto.spec) for e in at.get("plotly_chart")]


def values(array) -> list:
    """A plotly data array as a list; plotly ships numeric arrays base64-encoded ({"bdata", "dtype"})."""
    import base64

    import numpy as np

    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


# -- empty store ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_with_an_empty_store(env, name):
    at = page(name)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.title, f"{name} shows no title"
    assert not Path(env["OPPU_DB"]).exists(), "an empty dashboard must not create the results store"


def test_empty_store_says_what_to_do(env):
    assert "No runs yet" in texts(page("overview"))
    assert "No runs yet" in texts(page("compare"))
    assert "No personal adapters" in texts(page("adapters"))
    assert "No jobs yet" in texts(page("train"))
    analyses = page("analyses")
    assert "No activity level results" in texts(analyses)
    assert [b.label for b in analyses.button].count("Run this analysis") == 5


def test_missing_data_folder_is_a_warning_not_a_traceback(env, monkeypatch, tmp_path):
    monkeypatch.setenv("OPPU_DATA", str(tmp_path / "nothing-here"))
    for name in ("data_explorer", "train", "analyses"):
        at = page(name)
        assert not at.exception
        assert "No LaMP task folders found" in at.warning[0].value


def test_unreadable_store_is_an_error_message_not_a_traceback(env):
    Path(env["OPPU_DB"]).write_bytes(b"this is not a duckdb file" * 100)
    for name in ("overview", "compare", "analyses"):
        at = page(name)
        assert not at.exception, (name, at.exception)
        assert at.error and "Could not" in at.error[0].value


def test_unknown_task_in_the_url_is_explained(env):
    at = page("data_explorer", task="LaMP_9")
    assert "'LaMP_9'" in at.warning[0].value and at.selectbox(key="explore-task").value == "LaMP_2M"


def test_with_no_run_yet_every_task_picker_starts_on_the_default_task(env, tmp_path, monkeypatch, tiny_users):
    """LaMP_1 comes first in the registry, but the quick demo and every picker start on LaMP_2M (the README's)."""
    import shutil

    from oppu.data import write_oppu

    data = tmp_path / "two-tasks"
    shutil.copytree(env["OPPU_DATA"], data)
    write_oppu("LaMP_1", (), (), data)  # a first task in registry order, with no users: the pickers list it
    monkeypatch.setenv("OPPU_DATA", str(data))
    for name, key in (("overview", "demo-task"), ("data_explorer", "explore-task")):
        at = page(name)
        assert at.selectbox(key=key).options[:2] == ["LaMP_1 · citation", "LaMP_2M · movie tagging"]
        assert at.selectbox(key=key).value == "LaMP_2M", name


# -- populated store --------------------------------------------------------------------------------------------


@pytest.fixture()
def populated(env, tiny_task_data):
    populate(Path(env["OPPU_DB"]), tiny_task_data)
    return env


@pytest.mark.parametrize("name", PAGES)
def test_every_page_renders_with_a_populated_store(populated, name):
    at = page(name)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def test_overview_lists_the_run_and_its_metrics(populated, tiny_task_data):
    at = page("overview")
    runs = at.dataframe[0].value
    assert list(runs["run_id"]) == [RUN_ID]
    n_predictions = sum(len(u.queries) for u in tiny_task_data.test_users) * len(METHODS)
    assert at.metric[1].value == "1" and at.metric[2].value == str(n_predictions)
    chart = plotly_charts(at)[0]
    assert {t.name for t in chart.data} == set(LABELS.values())


def test_compare_shows_methods_side_by_side_and_filters_to_disagreements(populated, tiny_task_data):
    at = page("compare", user="alice")
    table = at.dataframe[0].value
    alice = tiny_task_data.user("alice")
    assert list(table.columns[:5]) == ["query", "input", "gold", LABELS["oppu"], LABELS["oppu+rag"]]
    assert list(table["query"]) == [q.id for q in alice.queries]
    from oppu.tasks import get_task

    # the query's own text (the description), not the instruction boilerplate nor the prompt
    assert list(table["input"]) == [get_task("LaMP_2M").query_text(q.input) for q in alice.queries]
    assert all(cell.startswith("✓") for cell in table[LABELS["oppu"]])
    assert all(cell.startswith("✗") for cell in table[LABELS["none"]])
    # retrieved items carry their text from the user's history and their score
    retrieved = at.dataframe[1].value
    assert retrieved.iloc[0]["id"] == alice.history[0].id and retrieved.iloc[0]["score"] == 1.5
    assert alice.history[0].fields["description"] in retrieved.iloc[0]["item"]

    at.toggle(key="compare-disagree").set_value(True).run()
    # every query disagrees (`none` is always wrong, OPPU always right), so nothing is filtered away
    assert len(at.dataframe[0].value) == len(alice.queries)


def test_compare_disagreement_filter_drops_agreeing_queries(env, tiny_task_data):
    from oppu.store import Store

    populate(Path(env["OPPU_DB"]), tiny_task_data)
    store = Store(env["OPPU_DB"])
    carol = tiny_task_data.user("carol")
    agree = [{"run_id": RUN_ID, "task": "LaMP_2M", "user_id": "carol", "query_id": carol.queries[0].id,
              "method": m, "k": 0, "peft": "lora", "retriever": "bm25", "prompt": "p", "raw_output": "comedy",
              "output": "comedy", "gold": carol.queries[0].gold, "retrieved_ids": [], "retrieved_scores": [],
              "history_size": 4, "correct": 1.0} for m in METHODS]
    store.add_predictions(agree)
    at = page("compare", user="carol")
    at.toggle(key="compare-disagree").set_value(True).run()
    assert "agree on every query" in texts(at)


def test_unknown_user_and_run_in_the_url_are_explained(populated):
    at = page("compare", user="mallory", run="no-such-run")
    warnings = " ".join(w.value for w in at.warning)
    assert "'mallory'" in warnings and "'no-such-run'" in warnings
    assert not at.exception and at.dataframe  # still shows a real user
    explorer = page("data_explorer", user="mallory")
    assert "'mallory'" in explorer.warning[0].value and not explorer.exception


def test_data_explorer_shows_the_chosen_users_history_and_position(populated, tiny_task_data):
    at = page("data_explorer", user="bob")
    bob = tiny_task_data.user("bob")
    assert at.selectbox(key="explore-user").value == "bob"
    assert list(at.dataframe[0].value["id"]) == [i.id for i in bob.history]
    histogram = plotly_charts(at)[0]
    assert histogram.layout.shapes[0].x0 == len(bob.history)
    users = (*tiny_task_data.test_users, *tiny_task_data.train_users)
    assert sorted(values(histogram.data[0].x)) == sorted(len(u.history) for u in users)

    at.segmented_control(key="explore-sort").set_value("least active first").run()
    assert at.selectbox(key="explore-user").options[0].startswith("carol")  # 4 items, the fewest

    at.text_input(key="explore-search").set_value("car").run()
    assert at.selectbox(key="explore-user").options == ["carol · 4 items"]
    assert "most popular tag: comedy" in texts(at)  # carol's profile text


def test_analyses_draw_every_figure_with_downloads(populated):
    at = page("analyses")
    charts = plotly_charts(at)
    titles = [c.layout.title.text for c in charts]
    assert titles == ["Performance by user activity (Fig. 3)", "Number of retrieved items (Fig. 4)", "PEFT type",
                      "Behaviour shift", "History format"]
    k_fig = charts[1]
    assert {t.name for t in k_fig.data} == {LABELS["rag"], LABELS["oppu+rag"]}
    # one stored run: every sweep but activity (3 users in 3 bins) has a single setting, so each offers its sweep
    shortcuts = sorted(b.key for b in at.button if b.label == "Run this analysis")
    assert shortcuts == ["run-behaviour-shift", "run-history-format", "run-k", "run-peft"]
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels.count("CSV") == 5 and labels.count("HTML") == 5
    from dashboard.widgets import _kaleido_works

    # PNG exactly when kaleido can render here; otherwise the page says why there is none
    assert labels.count("PNG") == (5 if _kaleido_works() else 0)
    assert _kaleido_works() or "No PNG download" in texts(at)


def test_run_this_analysis_submits_the_sweep(env, monkeypatch):
    """The shortcut builds the sweep with oppu.analyses and, once confirmed, submits one job per run (workers are
    not started here)."""
    from oppu import jobs
    from oppu.config import RunConfig
    from oppu.jobs import lifecycle

    monkeypatch.setattr(lifecycle, "_spawn", lambda root, job: None)
    at = page("analyses")
    next(b for b in at.button if b.key == "run-k").click().run()
    next(b for b in at.button if b.key == "launch-k").click().run()
    submitted = [RunConfig.from_dict(j["config"]) for j in reversed(jobs.list_jobs(env["OPPU_JOBS"]))]
    assert [c.retrieval.k for c in submitted] == [0, 1, 2, 4, 8]
    assert {c.tag for c in submitted} == {"k-sweep"} and {c.task for c in submitted} == {"LaMP_2M"}
    assert all(c.db == str(env["OPPU_DB"]) and c.data_dir == str(env["OPPU_DATA"]) for c in submitted)
    assert "Submitted sweep" in texts(at) and "5 runs" in texts(at)


def test_quick_demo_button_submits_a_small_job(env, monkeypatch):
    from oppu import jobs

    submitted = []
    monkeypatch.setattr(jobs, "submit", lambda cfg, root: submitted.append(cfg) or "job-demo")
    at = page("overview")
    next(b for b in at.button if b.label == "Run the quick demo experiment").click().run()
    (cfg,) = submitted
    from oppu.config import load_preset

    quick = load_preset("quick")
    assert cfg.users == quick["users"] and cfg.methods == tuple(quick["methods"]) and cfg.tag == "quick-demo"
    assert cfg.user_train.max_examples == quick["user_train"]["max_examples"]
    assert cfg.artifacts_dir == str(env["OPPU_ARTIFACTS"]) and cfg.task == "LaMP_2M"
    assert "Submitted job `job-demo`" in at.success[0].value


def test_train_page_lists_jobs_and_form_rejects_bad_input(populated):
    at = page("train")
    at.number_input(key="train-epochs").set_value(0)
    at.button[0].click()  # the form's submit button
    at.run()
    assert "epochs must be >= 1" in at.error[0].value
    assert not Path(populated["OPPU_JOBS"]).exists() or not any(Path(populated["OPPU_JOBS"]).iterdir())

    at.number_input(key="train-epochs").set_value(1)
    at.multiselect(key="train-methods").set_value([])
    at.button[0].click()
    at.run()
    assert "no methods given" in at.error[0].value


def test_train_form_starts_from_the_run_defaults_and_submits_them(env, monkeypatch):
    """Untouched, the form submits RunConfig()'s own settings; its methods are the paper's rows by label."""
    from oppu import jobs
    from oppu.config import METHODS, RunConfig

    submitted = []
    monkeypatch.setattr(jobs, "submit", lambda cfg, root: submitted.append(cfg) or "job-form")
    defaults = RunConfig()
    at = page("train")
    assert at.number_input(key="train-n").value == defaults.users
    assert at.number_input(key="train-epochs").value == defaults.user_train.epochs
    assert at.number_input(key="train-lr").value == defaults.user_train.lr
    assert at.number_input(key="train-rank").value == defaults.user_peft.r
    assert at.number_input(key="train-k").value == defaults.retrieval.k
    assert at.selectbox(key="train-peft").value == defaults.user_peft.kind
    assert at.selectbox(key="train-retriever").value == defaults.retrieval.retriever
    assert at.checkbox(key="train-adapt").value == defaults.task_adaptation
    picker = at.multiselect(key="train-methods")
    assert tuple(picker.value) == defaults.methods
    assert picker.options == [method_label(m) for m in METHODS]
    assert "oppu+rag+pag" not in METHODS

    at.number_input(key="train-rank").set_value(4)
    at.button[0].click()
    at.run()
    (cfg,) = submitted
    assert cfg.user_train == defaults.user_train and cfg.retrieval == defaults.retrieval
    assert cfg.methods == defaults.methods and cfg.users == defaults.users and cfg.batching == defaults.batching
    assert (cfg.user_peft.r, cfg.user_peft.alpha) == (4, 4)  # alpha follows the rank, as `oppu run --rank`
    assert cfg.db == str(env["OPPU_DB"]) and cfg.artifacts_dir == str(env["OPPU_ARTIFACTS"])
    assert "Submitted job `job-form`" in at.success[0].value


def test_train_form_errors_name_the_form_field_not_a_cli_flag(env, monkeypatch):
    at = page("train")
    at.number_input(key="train-n").set_value(0)
    at.button[0].click()
    at.run()
    message = at.error[0].value
    assert at.number_input(key="train-n").label in message  # "N most active"
    assert "users must be >= 1" in message and "user_ids" not in message and "--" not in message

    # a core message that suggests a CLI flag reads as the form field that sets it
    from dashboard import forms
    from oppu.config import ConfigError

    real = forms.build_config

    def strict(preset=None, overrides=None, base=None):
        if (overrides or {}).get("retrieval.k") == 3:
            raise ConfigError("k = 3 is not supported here: pass --k 1 or --k 2")
        return real(preset, overrides, base)

    monkeypatch.setattr(forms, "build_config", strict)
    at.number_input(key="train-n").set_value(2)
    at.number_input(key="train-k").set_value(3)
    at.button[0].click()
    at.run()
    message = at.error[0].value
    label = at.number_input(key="train-k").label
    assert message.startswith(f"Not submitted: **{label}**:") and "--k" not in message


def test_adapters_page_lists_exports_and_deletes_after_confirmation(populated):
    from test_charts import make_adapter

    artifacts = Path(populated["OPPU_ARTIFACTS"])
    folders = {user: make_adapter(artifacts, "LaMP_2M", "run1", user) for user in ("alice", "bob")}
    at = page("adapters")
    listed = at.dataframe[0].value
    assert sorted(listed["user_id"]) == ["alice", "bob"] and set(listed["items"]) == {3}
    assert [b.proto.label for b in at.get("download_button")] == ["Export as zip"]

    chosen = at.selectbox(key="adapter-pick").value
    assert chosen in {str(f) for f in folders.values()}
    delete = next(b for b in at.button if b.label == "Delete")
    assert delete.disabled  # nothing is deleted without the confirmation
    at.checkbox(key=f"adapter-confirm-{chosen}").check().run()
    next(b for b in at.button if b.label == "Delete").click().run()
    assert not Path(chosen).exists()
    assert "Deleted the adapters" in at.success[0].value
    assert len(at.dataframe[0].value) == 1


def test_train_form_submits_a_real_job_whose_answers_show_on_compare(env, monkeypatch, tiny_model_dir,
                                                                       tiny_task_data):
    """The whole loop on the tiny model: form -> job -> worker process -> store -> Compare and Adapters."""
    from oppu import jobs

    monkeypatch.setenv("OPPU_MODEL", str(tiny_model_dir))  # the form's default model
    at = page("train")
    assert at.text_input(key="train-model").value == str(tiny_model_dir)
    at.number_input(key="train-epochs").set_value(1)
    at.number_input(key="train-n").set_value(2)
    at.checkbox(key="train-adapt").uncheck()  # keeps the test short; the pipeline's own tests cover adaptation
    at.button[0].click()
    at.run()
    assert not at.error, [e.value for e in at.error]
    job_id = at.success[0].value.split("`")[1]

    root = env["OPPU_JOBS"]
    deadline = time.monotonic() + 240
    while jobs.get_job(root, job_id)["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(1)
    job = jobs.get_job(root, job_id)
    assert job["state"] == "done", jobs.logs(root, job_id, tail=30)
    assert job["config"]["batching"] == "multi_lora"  # the form's default engine

    at = page("train")
    history = at.dataframe[0].value
    assert history.loc[0, "job"] == job_id and history.loc[0, "state"] == "done"
    assert history.loc[0, "users done"] == "2/2"
    assert f"Job {job_id} finished" in texts(at)

    compare = page("compare", run=job_id)
    assert not compare.exception and not compare.error
    table = compare.dataframe[0].value
    user = compare.selectbox(key="compare-user").value
    assert user == tiny_task_data.most_active(1)[0].id
    assert list(table["query"]) == [q.id for q in tiny_task_data.user(user).queries]
    assert set(LABELS.values()) <= set(table.columns)
    assert all(isinstance(cell, str) and cell for cell in table[LABELS["oppu"]])

    adapters = page("adapters").dataframe[0].value
    assert set(adapters["user_id"]) == {u.id for u in tiny_task_data.most_active(2)}
    assert (adapters["run"] == job_id).all() and adapters["items"].min() >= 1


def _card_script():
    from dashboard import jobs_view

    jobs_view.job_card({"id": "20240101-000000-abcdef", "state": "running", "task": "LaMP_2M", "stage": "train_user",
                      "user_index": 2, "users_total": 4, "users_done": 1, "step": 3, "elapsed_s": 65, "eta_s": 130,
                      "losses": [{"step": 1, "loss": 2.0, "user_id": "alice"},
                                 {"step": 2, "loss": 1.5, "user_id": "alice"}]})


def test_running_job_card_shows_stage_user_loss_and_time_left(env):
    at = AppTest.from_function(_card_script, default_timeout=60).run()
    assert not at.exception
    bar = at.get("progress")[0].proto
    assert bar.value == 25  # one user of four done
    assert "train_user · step 3 · users done 1 of 4 · elapsed 1m 05s · time left 2m 10s" in bar.text
    assert [t.name for t in plotly_charts(at)[0].data] == ["alice"]
    assert any(b.label == "Cancel" for b in at.button)


def test_failed_job_shows_its_error_and_offers_retry(env, tiny_data_dir):
    from oppu import jobs
    from oppu.config import RunConfig

    def failing_runner(cfg, progress=None, should_stop=None, store=None, run_id=None, job_id=None):
        raise RuntimeError("the GPU caught fire")

    cfg = RunConfig(task="LaMP_2M", users=1, data_dir=str(tiny_data_dir), db=str(env["OPPU_DB"]),
                    artifacts_dir=str(env["OPPU_ARTIFACTS"]))
    job_id = jobs.submit(cfg, env["OPPU_JOBS"], start=False)
    jobs.run_worker(env["OPPU_JOBS"], job_id, runner=failing_runner)
    at = page("train")
    assert not at.exception
    assert f"Job {job_id} failed" in at.error[0].value and "the GPU caught fire" in at.error[0].value
    # a failure is retried after fixing its cause; Resume is for a job that was stopped
    assert any(b.label == "Retry" for b in at.button) and not any(b.label == "Resume" for b in at.button)


def test_cancel_from_the_running_list(env, tiny_data_dir, tiny_model_dir):
    """A submitted job is listed with a Cancel button; clicking it stops the job (its worker sees the flag)."""
    from oppu import jobs
    from oppu.config import ModelConfig, RunConfig

    cfg = RunConfig(task="LaMP_2M", users=1, data_dir=str(tiny_data_dir), db=str(env["OPPU_DB"]),
                    artifacts_dir=str(env["OPPU_ARTIFACTS"]), model=ModelConfig(name=str(tiny_model_dir)))
    job_id = jobs.submit(cfg, env["OPPU_JOBS"], start=False)
    at = page("train")  # listing the jobs starts the queued one when a worker slot is free
    assert f"Job `{job_id}`" in texts(at)
    next(b for b in at.button if b.key == f"cancel-{job_id}").click().run()
    deadline = time.monotonic() + 60
    while jobs.get_job(env["OPPU_JOBS"], job_id)["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.5)
    job = jobs.get_job(env["OPPU_JOBS"], job_id)
    assert job["state"] == "cancelled", f"job ended {job['state']}: {job.get('error')}"
    at.run()
    assert at.dataframe[0].value.loc[0, "state"] == "cancelled"
    assert any(b.label == "Resume" for b in at.button)


# -- navigation and the CLI command ---------------------------------------------------------------------------


def test_app_navigation_lists_every_page_and_switches(populated):
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "OPPU Studio"  # the default page
    for name, title in (("compare", "Compare methods, query by query"), ("analyses", "Analyses")):
        at.switch_page(f"../pages/{name}.py").run()
        assert not at.exception, at.exception
        assert at.title[0].value == title


def test_dashboard_command_binds_loopback_headless_without_usage_stats(tmp_path):
    import argparse

    from oppu.commands import dashboard

    parser = argparse.ArgumentParser()
    dashboard.configure(parser)
    argv, env, cwd = dashboard.streamlit_command(parser.parse_args(["--db", str(tmp_path / "x.duckdb")]), {})
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert argv[argv.index("--server.headless") + 1] == "true"
    assert argv[argv.index("--browser.gatherUsageStats") + 1] == "false"
    assert argv[4] == str(ROOT / "dashboard" / "app.py") and cwd == ROOT
    assert env == {"OPPU_DB": str(tmp_path / "x.duckdb")}
    with pytest.raises(ValueError, match="--port 0"):
        dashboard.streamlit_command(parser.parse_args(["--port", "0"]), {})


# -- speed on a big store ---------------------------------------------------------------------------------------


def test_pages_render_on_a_million_row_store(env):
    # Every page must work on a store of realistic size (aggregations in SQL, no full-table pandas loads that
    # would exhaust memory). How fast is measured by `python -m bench.bench_store`, never by a timed assert here.
    from bench.synthetic import seed_synthetic
    from oppu.store import Store

    store = Store(env["OPPU_DB"])
    seed_synthetic(store, 1_000_000, runs=40, users_per_run=100)
    assert store.prediction_count() >= 1_000_000
    for name in PAGES:
        at = page(name)
        assert not at.exception and not at.error, (name, at.exception, [e.value for e in at.error])
