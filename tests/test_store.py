"""Results store: schema, idempotent writes, resume bookkeeping and the dashboard's aggregations on small data."""

from __future__ import annotations

import json
import time

import duckdb
import pytest

from oppu.store import SCHEMA_VERSION, Store, StoreError, row_score, row_score_name


def _row(run_id="r1", user="u1", query="q1", method="none", output="comedy", gold="comedy", correct=1.0, **kw):
    row = {"run_id": run_id, "task": "LaMP_2M", "user_id": user, "query_id": query, "method": method, "k": 1,
           "peft": "lora", "retriever": "bm25", "prompt": "p", "raw_output": output + " ", "output": output,
           "gold": gold, "retrieved_ids": ["h1", "h2"], "retrieved_scores": [2.5, 1.0], "history_size": 10,
           "correct": correct}
    row.update(kw)
    return row


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "r.duckdb")
    s.create_run("r1", {"task": "LaMP_2M", "methods": ["none", "oppu"], "history_format": "full"},
                 task="LaMP_2M", model="tiny", data_fingerprint="abc", code_version="v1", tag="t")
    return s


def test_schema_is_versioned_and_reopen_is_harmless(tmp_path):
    path = tmp_path / "r.duckdb"
    Store(path)
    Store(path)  # a second open must not recreate or fail
    con = duckdb.connect(str(path), read_only=True)
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    con.close()
    assert {"runs", "predictions", "user_metrics", "run_metrics", "train_curves", "meta"} <= tables
    assert int(version) == SCHEMA_VERSION


def test_newer_schema_is_refused_with_advice(tmp_path):
    path = tmp_path / "r.duckdb"
    Store(path)
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(StoreError, match="newer than this code"):
        Store(path)


def test_a_file_that_is_not_a_database_is_reported_at_once(tmp_path):
    path = tmp_path / "notes.duckdb"
    path.write_text("these are not the results you are looking for\n" * 200)
    start = time.monotonic()
    with pytest.raises(StoreError, match="cannot open results store"):
        Store(path)
    assert time.monotonic() - start < 2  # not retried as if it were a lock held by another process


def test_in_memory_path_is_refused():
    with pytest.raises(StoreError, match="file path"):
        Store(":memory:")


def test_predictions_round_trip_lists_and_are_idempotent(store):
    rows = [_row(query="q1"), _row(query="q2", retrieved_ids=[], retrieved_scores=[], correct=0.0, output="x")]
    store.add_predictions(rows)
    store.add_predictions(rows)  # a resumed job writes the same user again
    got = store.predictions_for("r1", "u1")
    assert len(got) == 2
    assert list(got["retrieved_ids"].iloc[0]) == ["h1", "h2"]
    assert list(got["retrieved_scores"].iloc[0]) == [2.5, 1.0]
    assert list(got["retrieved_ids"].iloc[1]) == []
    # a changed answer for the same key replaces the old row instead of adding one
    store.add_predictions([_row(query="q2", output="comedy", correct=1.0)])
    got = store.predictions_for("r1", "u1").set_index("query_id")
    assert len(got) == 2 and got.loc["q2", "output"] == "comedy" and got.loc["q2", "correct"] == 1.0


def test_missing_row_keys_are_named(store):
    bad = _row()
    del bad["gold"]
    with pytest.raises(StoreError, match="gold"):
        store.add_predictions([bad])


def test_create_run_again_keeps_config_and_fills_blanks(store):
    store.finish_run("r1", {"none": {"accuracy": 0.5}})
    store.create_run("r1", {"task": "LaMP_2M", "user_ids": ["u9"]}, task="LaMP_2M", model="other",
                     data_fingerprint="zzz", code_version="v2", job_id="job-1")
    run = store.runs().set_index("run_id").loc["r1"]
    assert json.loads(run["config"])["methods"] == ["none", "oppu"]
    assert run["status"] == "running" and run["model"] == "tiny" and run["job_id"] == "job-1"
    assert run["data_fingerprint"] == "abc"


def test_done_users_needs_every_method_of_the_config(store):
    store.add_user_metrics("r1", "u1", "none", {"accuracy": 1.0}, history_size=10)
    assert store.done_users("r1") == set()
    store.add_user_metrics("r1", "u1", "oppu", {"accuracy": 0.0}, history_size=10)
    store.add_user_metrics("r1", "u2", "none", {"accuracy": 0.0}, history_size=3)
    assert store.done_users("r1") == {"u1"}
    store.add_user_metrics("r1", "u1", "oppu", {"accuracy": 1.0}, history_size=10)  # rewrite: no duplicate
    assert len(store.user_metrics("r1")) == 3


def test_finish_run_replaces_metrics_and_sets_status(store):
    store.finish_run("r1", {"none": {"accuracy": 0.25, "f1": 0.1}}, status="interrupted")
    store.finish_run("r1", {"none": {"accuracy": 0.5}, "oppu": {"accuracy": 0.75}})
    m = store.run_metrics("r1")
    assert sorted(zip(m["method"], m["value"])) == [("none", 0.5), ("oppu", 0.75)]
    run = store.runs().iloc[0]
    assert run["status"] == "done" and run["finished"] is not None
    with pytest.raises(StoreError, match="create_run first"):
        store.finish_run("nope", {})


def test_train_curve_points_replace_same_steps(store):
    store.add_train_curve("r1", "u1", "user", [(1, 2.0), (2, 1.5)])
    store.add_train_curve("r1", "u1", "user", [(2, 1.4), (3, 1.2)])
    curve = store.train_curve("r1", "u1")
    assert list(curve["step"]) == [1, 2, 3] and list(curve["loss"]) == [2.0, 1.4, 1.2]


def test_dashboard_aggregations_on_known_data(store):
    # u1: small history, always right with oppu; u2: large history, never right
    rows = []
    for user, hist, ok in (("u1", 2, 1.0), ("u2", 50, 0.0)):
        for q in ("q1", "q2"):
            rows.append(_row(user=user, query=q, method="oppu", history_size=hist, correct=ok,
                             output="a" if ok else "b"))
            rows.append(_row(user=user, query=q, method="none", history_size=hist, correct=0.0, output="b"))
    store.add_predictions(rows)
    curve = store.activity_curve("LaMP_2M", bins=2).set_index(["bin", "method"])
    assert curve.loc[(1, "oppu"), "score"] == 1.0 and curve.loc[(2, "oppu"), "score"] == 0.0
    assert curve.loc[(1, "oppu"), "history_max"] == 2 and curve.loc[(2, "oppu"), "history_min"] == 50
    users = store.run_users("r1").set_index(["user_id", "method"])
    assert users.loc[("u1", "oppu"), "score"] == 1.0 and users.loc[("u1", "oppu"), "n"] == 2
    disagree = store.methods_disagree("r1", "u1")
    assert list(disagree["query_id"]) == ["q1", "q2"] and list(disagree["oppu"]) == ["a", "a"]
    assert store.methods_disagree("r1", "u2").empty  # both methods said "b"
    peft = store.peft_comparison("LaMP_2M")
    assert list(peft["method"]) == ["oppu"] and peft["score"].iloc[0] == 0.5
    assert store.k_sweep("LaMP_2M").empty  # no retrieving method in this run
    fmt = store.history_format("LaMP_2M").set_index("method")
    assert fmt.loc["oppu", "history_format"] == "full" and fmt.loc["none", "score"] == 0.0
    shift = store.behaviour_shift("LaMP_2M")
    assert set(shift["history_cutoff"]) == {""}
    latest = store.latest_runs(5).iloc[0]
    assert latest["users"] == 2 and latest["predictions"] == 8 and list(latest["methods"]) == ["none", "oppu"]
    assert store.counts() == {"runs": 1, "predictions": 8, "users": 2, "tasks": 1, "train_points": 0}


def test_seed_synthetic_fills_requested_rows(tmp_path):
    s = Store(tmp_path / "bench.duckdb")
    s.seed_synthetic(7000, runs=7)
    counts = s.counts()
    assert counts["predictions"] == 7000 and counts["runs"] == 7 and counts["tasks"] == 7
    assert counts["train_points"] == 7 * 100 * 20
    assert not s.k_sweep("LaMP_2M").empty and not s.activity_curve("LaMP_4").empty


@pytest.mark.parametrize(("task", "gold", "output", "expected"), [
    ("LaMP_2M", "comedy", " comedy ", 1.0), ("LaMP_2M", "comedy", "drama", 0.0),
    ("LaMP_3", "4", "2", 2.0), ("LaMP_3", "1", "not a number", 4.0),  # unparsable: the farther of 1 and 5
    ("LaMP_4", "a b c d", "a b x y", 0.5), ("LaMP_2M", None, "comedy", None)])
def test_row_score_matches_the_lamp_metric_on_one_example(task, gold, output, expected):
    assert row_score(task, gold, output) == (None if expected is None else pytest.approx(expected))


def test_row_score_names_follow_the_task_kind():
    assert row_score_name("LaMP_1") == ("accuracy", False)
    assert row_score_name("LaMP_3") == ("absolute error", True)
    assert row_score_name("LaMP_7") == ("ROUGE-L", False)


def test_missing_correct_is_computed_and_run_metrics_recomputed(store):
    store.add_predictions([_row(query="q1", correct=None), _row(query="q2", output="drama", correct=None),
                           _row(query="q3", gold=None, correct=None)])
    got = store.predictions_for("r1", "u1").set_index("query_id")["correct"]
    assert got["q1"] == 1.0 and got["q2"] == 0.0 and got.isna()["q3"]
    metrics = store.compute_run_metrics("r1")
    assert metrics["none"]["accuracy"] == 0.5  # the unlabelled query is left out
