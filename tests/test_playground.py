"""The playground: its core answers one input per method exactly as the run did (same prompts, same retrieved
items, same answers), and the page renders those answers side by side through AppTest."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from test_serve_support import MAX_NEW, tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("play")
    cfg, run_id = tiny_run(tiny_model_dir, tiny_data_dir, root, users=2)
    return cfg, run_id, root


@pytest.fixture(scope="module")
def service(run, tiny_model_dir):
    from oppu.serve.service import ServeConfig, Service

    cfg, _, _ = run
    svc = Service(ServeConfig(artifacts=cfg.artifacts_dir, model=str(tiny_model_dir), device="cpu"))
    yield svc
    svc.close()


def test_compare_gives_each_methods_stored_answer_prompt_and_retrieved_items(run, service, tiny_data_dir,
                                                                           tiny_users):
    from oppu.serve.playground import compare, runs
    from oppu.store import Store

    cfg, run_id, _ = run
    assert [(r.run_id, set(r.users)) for r in runs(cfg.artifacts_dir)] == [(run_id, {"alice", "bob"})]
    stored = Store(cfg.db).predictions_for(run_id, "alice")
    alice = next(u for u in tiny_users[1] if u.id == "alice")
    for query in alice.queries:
        answers = compare(service, tiny_data_dir, run_id, "alice", query.input, query_date=query.date,
                          max_new_tokens=MAX_NEW)
        assert [a.method for a in answers] == ["none", "rag", "oppu", "oppu+rag"]
        for a in answers:
            row = stored[(stored["query_id"] == query.id) & (stored["method"] == a.method)].iloc[0]
            assert (a.prompt, a.answer) == (row["prompt"], row["raw_output"]), a.method
            assert [r.item_id for r in a.retrieved] == list(row["retrieved_ids"])
        assert answers[2].model_id == f"{run_id}/alice@plain" and answers[1].retrieved


def test_a_method_the_run_did_not_train_is_unavailable_not_faked(tiny_model_dir, tiny_data_dir, tmp_path):
    from oppu.serve.playground import compare, runs
    from oppu.serve.service import ServeConfig, Service

    cfg, run_id = tiny_run(tiny_model_dir, tiny_data_dir, tmp_path, methods=("none", "oppu"), users=1)
    svc = Service(ServeConfig(artifacts=cfg.artifacts_dir, model=str(tiny_model_dir), device="cpu"))
    try:
        user = runs(cfg.artifacts_dir)[0].users[0]
        answers = {a.method: a for a in compare(svc, tiny_data_dir, run_id, user, "space ship love city",
                                                max_new_tokens=2)}
        assert answers["oppu+rag"].model_id is None and "rag" in answers["oppu+rag"].note
        assert answers["oppu"].answer and answers["rag"].answer  # rag needs no adapter of the user
    finally:
        svc.close()


def test_page_shows_the_four_answers_side_by_side(run, tiny_model_dir, tiny_data_dir, monkeypatch):
    cfg, run_id, _ = run
    for name, value in (("OPPU_ARTIFACTS", cfg.artifacts_dir), ("OPPU_DATA", tiny_data_dir), ("OPPU_DB", cfg.db),
                        ("OPPU_MODEL", tiny_model_dir)):
        monkeypatch.setenv(name, str(value))
    at = AppTest.from_file(str(ROOT / "pages" / "playground.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="play-run").value == run_id
    at.button(key="play-go").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert [h.value for h in at.subheader] == ["Non-personalized", "RAG", "OPPU", "OPPU+RAG"]
    assert any(f"{run_id}/" in c.value for c in at.caption)
    at.radio(key="play-source").set_value("My own input").run()
    at.text_area(key="play-text").input("space ship love").run()
    at.button(key="play-go").click().run()
    assert not at.exception and len(at.subheader) == 4


def test_page_without_adapters_says_what_to_do(tmp_path, monkeypatch, tiny_data_dir):
    monkeypatch.setenv("OPPU_ARTIFACTS", str(tmp_path / "none"))
    monkeypatch.setenv("OPPU_DATA", str(tiny_data_dir))
    at = AppTest.from_file(str(ROOT / "pages" / "playground.py"), default_timeout=60).run()
    assert not at.exception and "No personal adapters" in at.info[0].value
