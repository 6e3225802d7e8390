"""Results store: schema, idempotent writes, resume bookkeeping and the dashboard's aggregations on small data."""

from __future__ import annotations

import json
import time

import duckdb
import pytest

from bench.synthetic import seed_synthetic
from oppu.store import SCHEMA_VERSION, Store, StoreError


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
    seed_synthetic(s, 7000, runs=7)
    counts = s.counts()
    assert counts["predictions"] == 7000 and counts["runs"] == 7 and counts["tasks"] == 7
    assert counts["train_points"] == 7 * 100 * 20
    assert not s.k_sweep("LaMP_2M").empty and not s.activity_curve("LaMP_4").empty


def test_missing_correct_is_computed_and_run_metrics_recomputed(store):
    store.add_predictions([_row(query="q1", correct=None), _row(query="q2", output="drama", correct=None),
                           _row(query="q3", gold=None, correct=None)])
    got = store.predictions_for("r1", "u1").set_index("query_id")["correct"]
    assert got["q1"] == 1.0 and got["q2"] == 0.0 and got.isna()["q3"]
    metrics = store.compute_run_metrics("r1")
    assert metrics["none"]["accuracy"] == 0.5  # the unlabelled query is left out
    assert metrics["none"]["lenient_accuracy"] == 0.5


# -- official and lenient readings -------------------------------------------------------------------------------

def _raw_row(query, raw, gold="comedy", method="none", user="u1"):
    """A row as the experiment writes it: the raw generation with both readings and both scores."""
    from oppu.metrics import prediction_fields

    row = _row(query=query, gold=gold, method=method, user=user)
    row.update(prediction_fields("LaMP_2M", gold, raw))
    return row


def test_round_trip_keeps_both_readings_and_scores(store):
    store.add_predictions([_raw_row("q1", "comedy."), _raw_row("q2", " comedy\n"), _raw_row("q3", "tag: comedy")])
    got = store.predictions_for("r1", "u1").set_index("query_id")
    assert list(got["output"]) == ["comedy.", "comedy", "tag: comedy"]
    assert list(got["correct"]) == [0.0, 1.0, 0.0]
    assert list(got["lenient_output"]) == ["comedy"] * 3 and list(got["lenient_correct"]) == [1.0] * 3
    assert got.loc["q1", "raw_output"] == "comedy."
    metrics = store.compute_run_metrics("r1")["none"]
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["lenient_accuracy"] == 1.0
    assert store.run_users("r1").set_index("method").loc["none", "score"] == pytest.approx(1 / 3)
    assert store.run_users("r1", scoring="lenient").set_index("method").loc["none", "score"] == 1.0
    with pytest.raises(ValueError, match="unknown scoring"):
        store.run_users("r1", scoring="strict")


def test_a_row_without_the_lenient_reading_gets_it_from_the_raw_output(store):
    store.add_predictions([_row(query="q1", raw_output="Tag: Comedy.", output="Tag: Comedy.", correct=None)])
    got = store.predictions_for("r1", "u1").iloc[0]
    assert got["correct"] == 0.0 and got["lenient_output"] == "comedy" and got["lenient_correct"] == 1.0


def test_queries_default_to_the_official_score_and_offer_the_lenient_one(store):
    store.add_predictions([_raw_row("q1", "comedy", method="oppu"), _raw_row("q2", "comedy.", method="oppu"),
                           _raw_row("q1", "comedy.", method="none"), _raw_row("q2", "drama", method="none")])
    assert store.activity_curve("LaMP_2M", bins=1).set_index("method")["score"].to_dict() == {
        "none": 0.0, "oppu": 0.5}
    assert store.activity_curve("LaMP_2M", bins=1, scoring="lenient").set_index("method")["score"].to_dict() == {
        "none": 0.5, "oppu": 1.0}
    # the dashboard passes the scoring as the second positional argument of every analysis query
    assert store.activity_curve("LaMP_2M", "lenient", bins=1)["score"].max() == 1.0
    assert store.peft_comparison("LaMP_2M")["score"].iloc[0] == 0.5
    assert store.peft_comparison("LaMP_2M", scoring="lenient")["score"].iloc[0] == 1.0
    assert store.history_format("LaMP_2M", scoring="lenient").set_index("method").loc["none", "score"] == 0.5
    # officially "comedy." differs from "comedy"; leniently both read "comedy" and only q2 disagrees
    assert list(store.methods_disagree("r1", "u1")["query_id"]) == ["q1", "q2"]
    lenient = store.methods_disagree("r1", "u1", scoring="lenient")
    assert list(lenient["query_id"]) == ["q2"] and list(lenient["oppu"]) == ["comedy"]


def test_run_and_user_metrics_filter_by_scoring(store):
    both = {"accuracy": 0.25, "f1": 0.2, "lenient_accuracy": 0.75, "lenient_f1": 0.7}
    store.finish_run("r1", {"none": both})
    store.add_user_metrics("r1", "u1", "none", both, history_size=3)
    assert sorted(store.run_metrics("r1")["metric"]) == ["accuracy", "f1"]
    assert sorted(store.run_metrics("r1", "lenient")["metric"]) == ["lenient_accuracy", "lenient_f1"]
    assert len(store.run_metrics("r1", scoring=None)) == 4
    assert store.user_metrics("r1").set_index("metric").loc["accuracy", "value"] == 0.25
    assert store.user_metrics("r1", "lenient").set_index("metric").loc["lenient_accuracy", "value"] == 0.75


# -- upgrading a schema 1 file -----------------------------------------------------------------------------------

_V1_SCHEMA = (
    "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, created TIMESTAMP, finished TIMESTAMP, status VARCHAR,
        task VARCHAR, model VARCHAR, tag VARCHAR, job_id VARCHAR, config JSON, data_fingerprint VARCHAR,
        code_version VARCHAR)""",
    """CREATE TABLE predictions (run_id VARCHAR, task VARCHAR, user_id VARCHAR, query_id VARCHAR, method VARCHAR,
        k INTEGER, peft VARCHAR, retriever VARCHAR, prompt VARCHAR, raw_output VARCHAR, output VARCHAR,
        gold VARCHAR, retrieved_ids VARCHAR[], retrieved_scores DOUBLE[], history_size INTEGER, correct DOUBLE,
        created TIMESTAMP)""",
    """CREATE TABLE user_metrics (run_id VARCHAR, user_id VARCHAR, method VARCHAR, metric VARCHAR, value DOUBLE,
        history_size INTEGER, created TIMESTAMP)""",
    "CREATE TABLE run_metrics (run_id VARCHAR, method VARCHAR, metric VARCHAR, value DOUBLE)",
    """CREATE TABLE train_curves (run_id VARCHAR, user_id VARCHAR, stage VARCHAR, step INTEGER, loss DOUBLE,
        created TIMESTAMP)""",
)


def _v1_file(path, schema=_V1_SCHEMA):
    """A schema 1 store as the old code wrote it: `output` = normalize(raw), scored leniently."""
    con = duckdb.connect(str(path))
    for statement in schema:
        con.execute(statement)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("INSERT INTO runs (run_id, task, status, config) VALUES ('old', 'LaMP_3', 'done', '{}')")
    for query, raw, output, gold, err in (("q1", "4 stars", "4", "4", 0.0), ("q2", " 2\n", "2", "2", 0.0)):
        con.execute("INSERT INTO predictions (run_id, task, user_id, query_id, method, raw_output, output, gold, "
                    "history_size, correct) VALUES ('old', 'LaMP_3', 'u1', ?, 'none', ?, ?, ?, 5, ?)",
                    [query, raw, output, gold, err])
    for name in ("MAE", "RMSE"):
        con.execute("INSERT INTO user_metrics VALUES ('old', 'u1', 'none', ?, 0.0, 5, NULL)", [name])
        con.execute("INSERT INTO run_metrics VALUES ('old', 'none', ?, 0.0)", [name])
    con.close()


def test_a_schema_1_file_is_upgraded_to_both_readings(tmp_path):
    path = tmp_path / "old.duckdb"
    _v1_file(path)
    store = Store(path)
    got = store.predictions_for("old", "u1").set_index("query_id")
    # "4 stars" officially: unparsable -> the farther of 1 and 5 from gold 4 -> 1.0, error 3
    assert got.loc["q1", "output"] == "4 stars" and got.loc["q1", "correct"] == 3.0
    assert got.loc["q2", "output"] == "2" and got.loc["q2", "correct"] == 0.0
    assert list(got["lenient_output"]) == ["4", "2"] and list(got["lenient_correct"]) == [0.0, 0.0]
    run = store.run_metrics("old").set_index("metric")["value"]
    assert run["MAE"] == 1.5 and run["RMSE"] == pytest.approx((9 / 2) ** 0.5)
    assert store.run_metrics("old", "lenient").set_index("metric")["value"].to_dict() == {
        "lenient_MAE": 0.0, "lenient_RMSE": 0.0}
    users = store.user_metrics("old", scoring=None).set_index("metric")
    assert users.loc["MAE", "value"] == 1.5 and users.loc["lenient_MAE", "value"] == 0.0
    assert users.loc["MAE", "history_size"] == 5
    assert store.done_users("old") == set()  # the config names no methods; nothing is marked done by accident
    Store(path)  # a second open finds schema 2 and changes nothing
    assert len(Store(path).user_metrics("old", scoring=None)) == 4
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    con.close()


def test_a_failed_upgrade_leaves_the_file_unchanged_and_says_what_to_do(tmp_path):
    path = tmp_path / "broken.duckdb"
    broken = tuple(s.replace("raw_output VARCHAR, ", "") for s in _V1_SCHEMA)  # a file without raw outputs
    con = duckdb.connect(str(path))
    for statement in broken:
        con.execute(statement)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.close()
    with pytest.raises(StoreError, match=rf"could not upgrade .* from schema 1 to {SCHEMA_VERSION}.*point --db"):
        Store(path)
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    assert "lenient_output" not in {r[0] for r in con.execute("DESCRIBE predictions").fetchall()}
    con.close()


# -- oppu results --------------------------------------------------------------------------------------------------

def test_oppu_results_shows_the_official_metric_unless_asked(store, capsys):
    from oppu.__main__ import main

    store.add_predictions([_raw_row("q1", "comedy."), _raw_row("q2", "comedy")])
    store.finish_run("r1", store.compute_run_metrics("r1"))
    assert main(["results", "--db", store.path]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "0.5000" in out and "lenient_" not in out
    assert main(["results", "--db", store.path, "--scoring", "lenient", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert runs[0]["scoring"] == "lenient" and runs[0]["metrics"]["none"]["lenient_accuracy"] == 1.0
    assert "accuracy" not in runs[0]["metrics"]["none"]
    assert main(["results", "--db", store.path, "--scoring", "both"]) == 0
    out = capsys.readouterr().out
    assert "lenient_accuracy" in out and "accuracy" in out


def test_answer_spread_counts_distinct_answers_and_the_most_common(store):
    store.add_predictions([_row(query=f"q{i}", method="none", output="1") for i in range(4)]
                          + [_row(query=f"q{i}", method="oppu", output=str(i % 2 + 3)) for i in range(3)]
                          + [_row(run_id="other", query="q9", method="none", output="5")])
    spread = store.answer_spread(["r1"]).set_index("method")
    assert spread.loc["none"].to_dict() == {"answers": 4, "distinct": 1, "top_answer": "1", "top_share": 1.0}
    assert (spread.loc["oppu", "answers"], spread.loc["oppu", "distinct"]) == (3, 2)
    assert spread.loc["oppu", "top_answer"] == "3" and spread.loc["oppu", "top_share"] == 2 / 3
