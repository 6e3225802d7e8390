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


def _seeded(run_id, k, seed, group, created=0, **train):
    """One replicate of a k-sweep setting, as `oppu.replicates.with_seed` stores it."""
    return _run(run_id, k=k, created=created, user_train={"epochs": 2, "seed": seed, **train},
                generation={"seed": seed}, seed_group=group)


def test_the_seeds_of_a_setting_are_one_setting_and_pool_for_its_knob_value():
    runs = [_seeded(f"k{k}-s{s}", k, s, f"group-k{k}", created=10 + s) for k in (0, 4) for s in (0, 1, 2)]
    runs += [_run("k4-alone", k=4, created=1),  # an older lone run of k=4: the newer seed group stands for k=4
             _seeded("lr", 4, 0, "group-lr", created=20, lr=0.1),
             _seeded("k4-s1-again", 4, 1, "group-k4", created=5)]  # the group ran seed 1 twice: the newest counts
    used = comparable_runs("k", runs)
    assert used.settings() == {"k=0": ("k0-s0", "k0-s1", "k0-s2"), "k=4": ("k4-s0", "k4-s1", "k4-s2")}
    assert {len(seeds) for seeds in used.settings().values()} == {3}
    assert [used.seeds[r] for r in used.run_ids] == [0, 1, 2, 0, 1, 2]
    assert used.excluded == {"k4-alone": "repeats k=4 (the newest run or seed group of a setting is used)",
                             "lr": "differs in user_train.lr",
                             "k4-s1-again": "repeats seed 1 of k=4 (the newest run of a seed is used)"}
    assert used.describe().startswith("Runs used: `k0-s0`, `k0-s1`, `k0-s2` (k=0, seeds 0, 1, 2), "
                                      "`k4-s0`, `k4-s1`, `k4-s2` (k=4, seeds 0, 1, 2).")
    # a seed outside a replicate set is no setting either: a lone k=8 run under seed 5 joins the comparison
    alone = comparable_runs("k", [*runs, _run("k8", k=8, created=3, user_train={"epochs": 2, "seed": 5})])
    assert alone.settings()["k=8"] == ("k8",) and alone.seeds["k8"] == 5


def test_activity_pools_the_newest_seed_group():
    runs = [_seeded(f"s{s}", 1, s, "group", created=10 + s) for s in (0, 1)] + [_run("older", created=1)]
    used = comparable_runs("activity", runs)
    assert used.run_ids == ("s0", "s1") and used.excluded == {"older": "is an older run of the same setting"}


def _replicate(db: Path, task_data, run_id: str, seed: int, group: str, k: int = 1) -> None:
    """A finished run (`test_pages.populate`) recorded as seed `seed` of `group`, config and rows alike."""
    import json

    import duckdb

    populate(db, task_data, run_id, k=k)
    with duckdb.connect(str(db)) as con:
        config = json.loads(con.execute("SELECT config FROM runs WHERE run_id = ?", [run_id]).fetchone()[0])
        config.update(seed_group=group, user_train={"seed": seed}, generation={"seed": seed})
        con.execute("UPDATE runs SET config = ? WHERE run_id = ?", [json.dumps(config), run_id])
        con.execute("UPDATE predictions SET seed = ? WHERE run_id = ?", [seed, run_id])


def test_the_seeds_of_a_setting_are_resampled_as_seeds_not_as_more_users(env, tiny_task_data):
    from oppu.analyses import comparable_frame
    from oppu.store import Store
    from oppu.uncertainty import grouped_intervals, with_activity_bins

    db = Path(env["OPPU_DB"])
    for k in (1, 2):
        for seed in (0, 1, 2):
            _replicate(db, tiny_task_data, f"k{k}-s{seed}", seed, f"group-k{k}", k=k)
    store = Store(db)
    cells = store.analysis_cells("LaMP_2M")
    used = comparable_runs("k", store.runs().to_dict("records"))
    assert {v: len(r) for v, r in used.settings().items()} == {"k=1": 3, "k=2": 3} and not used.excluded
    frame = comparable_frame("k", cells, used)
    assert set(frame["k"]) == {1, 2} and set(frame["runs"]) == {3}
    one_seed = cells[cells["run_id"] == "k1-s0"]
    pooled = frame[frame["k"] == 1].set_index("method")["n"].to_dict()
    assert pooled and pooled == {m: 3 * n for m, n in one_seed.groupby("method")["n"].sum().items() if m in pooled}
    # the cells behind the figure's points, as pages/analyses.py picks them for the error bars
    behind = cells[cells["run_id"].isin(used.run_ids) & cells["method"].isin(set(frame["method"]))]
    intervals = grouped_intervals(behind, "k", n_boot=50)
    users = len(tiny_task_data.test_users)
    assert set(intervals["n_runs"]) == {3} and set(intervals["n_users"]) == {users}

    activity = comparable_runs("activity", store.runs().to_dict("records"))
    assert len(activity.run_ids) == 3  # the newest group's seeds, pooled
    binned = comparable_frame("activity", cells, activity)
    assert binned.groupby("bin")["users"].max().sum() == users  # each user in one bin, once
    ranges = binned.drop_duplicates("bin")[["history_min", "history_max"]].to_records(index=False).tolist()
    seeded = with_activity_bins(cells[cells["run_id"].isin(activity.run_ids)])
    assert seeded.drop_duplicates("bin").sort_values("bin")[["history_min", "history_max"]] \
        .to_records(index=False).tolist() == ranges
