"""Analyses are comparable by construction: only runs that differ in the swept knob alone are drawn, the figure
says which runs it used and why others were left out, and activity bins never share a label."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from test_pages import page, plotly_charts, populate, texts, values

from oppu.analyses import activity_bins, bin_label, comparable_runs


def _run(run_id, k=1, users=4, model="m", data="f", status="done", created=0, tag="", **extra):
    config = {"task": "LaMP_2M", "users": users, "retrieval": {"k": k, "retriever": "bm25"}, "tag": tag,
              "user_train": {"epochs": 2}, **extra}
    return {"run_id": run_id, "config": config, "model": model, "data_fingerprint": data, "status": status,
            "created": created}


def test_only_runs_that_differ_in_the_swept_knob_alone_are_compared():
    runs = [_run("k0", k=0, created=1), _run("k1", k=1, created=2, tag="other tag"), _run("k4", k=4, created=3),
            _run("more-users", k=2, users=8, created=4), _run("other-model", k=8, model="big", created=5),
            _run("other-data", k=8, data="g", created=6), _run("epochs", k=2, created=7, user_train={"epochs": 3}),
            _run("failed", k=2, status="failed", created=8), _run("k4-older", k=4, created=0)]
    used = comparable_runs("k", runs)
    assert used.run_ids == ("k0", "k1", "k4") and used.values["k4"] == "k=4"
    assert "users" in used.excluded["more-users"] and "model" in used.excluded["other-model"]
    assert "data_fingerprint" in used.excluded["other-data"] and "epochs" in used.excluded["epochs"]
    assert "failed" in used.excluded["failed"] and "repeats k=4" in used.excluded["k4-older"]
    assert "Runs used: `k0` (k=0), `k1` (k=1), `k4` (k=4)." in used.describe()


def test_activity_bins_never_split_one_history_size_and_have_distinct_labels():
    sizes = [300] * 6 + [10, 20]  # most users at the 300-item cap: equal-count bins would repeat "300–300"
    bins = activity_bins(sizes, 4)
    labels = [bin_label(lo, hi) for lo, hi in bins]
    assert len(set(labels)) == len(labels) == 3 and labels[-1] == "300 items"
    assert activity_bins(list(range(1, 9)), 4) == [(1, 2), (3, 4), (5, 6), (7, 8)]
    for sizes in ([1, 1, 2, 2, 3, 3, 4, 4, 100], [5] * 7, [1, 50, 50, 50, 51, 52, 90, 90]):
        bins = activity_bins(sizes, 4)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(bins))  # disjoint, increasing
        assert all(any(lo <= s <= hi for lo, hi in bins) for s in sizes)  # every user has a bin


def test_the_k_figure_uses_comparable_runs_and_says_which(env, tiny_task_data):
    db = Path(env["OPPU_DB"])
    populate(db, tiny_task_data, "run-k1", k=1)
    populate(db, tiny_task_data, "run-k2", k=2)
    populate(db, tiny_task_data, "run-other", k=4)
    import duckdb

    with duckdb.connect(str(db)) as con:  # the k=4 run used another model: it must never be mixed in
        con.execute("UPDATE runs SET model = 'another' WHERE run_id = 'run-other'")
    at = page("analyses")
    assert not at.exception
    shown = texts(at)
    assert "Runs used: `run-k1` (k=1), `run-k2` (k=2). Left out 1: `run-other` differs in model" in shown
    fig = next(f for f in plotly_charts(at) if "retrieved" in str(f.layout.title.text))
    assert {x for t in fig.data for x in values(t.x)} == {1, 2}


@pytest.mark.parametrize("kind", ["activity", "peft", "history-format", "behaviour-shift"])
def test_every_analysis_kind_builds_its_table_from_comparable_runs(env, tiny_task_data, kind):
    from oppu.analyses import comparable_frame
    from oppu.store import Store

    populate(Path(env["OPPU_DB"]), tiny_task_data, "run-a")
    store = Store(env["OPPU_DB"])
    used = comparable_runs(kind, store.runs().to_dict("records"))
    frame = comparable_frame(kind, store.analysis_cells("LaMP_2M"), used)
    assert used.run_ids == ("run-a",) and not frame.empty and (frame["score"].between(0, 1)).all()
