"""The validation split (`oppu.splits`) and tuning on it (`oppu.tuning`, `oppu tune`): settings are chosen on
each test user's held-out history, never on their test queries."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from oppu.__main__ import main
from oppu.config import RunConfig, build_config, load_preset, preset_chosen_on
from oppu.splits import SplitError, held_out_positions, holdout_user, run_data, validation_data
from oppu.tasks import TASKS, get_task
from oppu.tuning import Point, TuneError, choose, grid_points, objective_methods, parse_grid, point_score


def test_holdout_moves_the_most_recent_items_into_the_queries(tiny_users):
    task = get_task("LaMP_2M")
    alice = tiny_users[1][0]  # 8 dated items h0..h7, profile none
    held = holdout_user(task, alice, 3)
    assert [q.id for q in held.queries] == ["val:alice-h5", "val:alice-h6", "val:alice-h7"]
    # gold is the item's own answer, the input the item's training example (the query's LaMP format)
    for query, item in zip(held.queries, alice.history[5:]):
        assert query.gold == item.fields["tag"]
        assert query.input == task.history_example(item)[0]
    assert [i.id for i in held.history] == [f"alice-h{i}" for i in range(5)]
    # no test query survives, no held-out answer stays visible in the history
    assert not {q.id for q in alice.queries} & {q.id for q in held.queries}
    assert not {q.id.removeprefix("val:") for q in held.queries} & {i.id for i in held.history}


def test_recency_is_by_date_then_position(tiny_users):
    from dataclasses import replace

    task = get_task("LaMP_2M")
    alice = tiny_users[1][0]
    # the oldest-positioned item dated last is the most recent; undated items count as oldest
    items = list(alice.history)
    items[0] = replace(items[0], date="2030-01-01")
    items[7] = replace(items[7], date=None)
    assert held_out_positions(task, items, 2) == [0, 6]


def test_profile_text_written_from_the_whole_history_is_dropped(tiny_users):
    carol = tiny_users[1][2]
    assert carol.profile_text
    assert holdout_user(get_task("LaMP_2M"), carol, 1).profile_text is None


def test_too_short_a_history_is_a_clear_error(tiny_users):
    carol = tiny_users[1][2]  # 4 items
    with pytest.raises(SplitError, match="carol has 4 usable history item.*lower validation_items"):
        holdout_user(get_task("LaMP_2M"), carol, 4)


def test_a_user_too_short_for_the_split_answers_nothing(tiny_task_data):
    val = validation_data(tiny_task_data, get_task("LaMP_2M"), 4)
    carol = val.user("carol")  # 4 items: none can be given up, no test query may stand in
    assert carol.queries == () and len(carol.history) == 4
    assert all(q.id.startswith("val:") for u in val.test_users for q in u.queries)
    assert [len(u.queries) for u in val.test_users] == [4, 4, 0]


@pytest.mark.parametrize("task_id", ["LaMP_1", "LaMP_7"])
def test_tasks_whose_items_do_not_ask_their_question_are_refused(tiny_task_data, task_id):
    with pytest.raises(SplitError, match=f"no validation split for {task_id}: .*Tune on another task"):
        validation_data(tiny_task_data, get_task(task_id), 2)


def test_every_other_task_has_a_validation_split():
    assert [t for t, task in TASKS.items() if task.history_answers_queries] == \
        ["LaMP_2N", "LaMP_2M", "LaMP_3", "LaMP_4", "LaMP_5"]


def test_run_data_applies_the_config_split(tiny_data_dir):
    base = {"task": "LaMP_2M", "data_dir": str(tiny_data_dir)}
    test = run_data(build_config(None, base))
    val = run_data(build_config(None, {**base, "split": "validation", "validation_items": 2}))
    assert val.train_users == test.train_users  # task adaptation's data is the same: the base is shared
    for before, after in zip(test.test_users, val.test_users):
        assert len(after.queries) == 2 and all(q.id.startswith("val:") for q in after.queries)
        assert len(after.history) == len(before.history) - 2


def test_split_is_checked_by_the_config():
    with pytest.raises(ValueError, match="split: use test or validation"):
        RunConfig(split="dev")
    with pytest.raises(ValueError, match="validation_items must be >= 1"):
        RunConfig(validation_items=0)


# -- tuning ----------------------------------------------------------------------------------------------------
def test_grid_parsing_and_points():
    grid = parse_grid(["user_train.lr=5e-4,1e-3", "user_train.epochs=1,2"])
    assert grid == {"user_train.lr": [5e-4, 1e-3], "user_train.epochs": [1, 2]}
    assert grid_points(grid) == [{"user_train.lr": 5e-4, "user_train.epochs": 1},
                                 {"user_train.lr": 5e-4, "user_train.epochs": 2},
                                 {"user_train.lr": 1e-3, "user_train.epochs": 1},
                                 {"user_train.lr": 1e-3, "user_train.epochs": 2}]
    for bad, message in [("user_train.lr", "is not KEY=V1,V2"), ("user_train.lr=", "is not KEY=V1,V2"),
                         ("split=test,validation", "cannot be tuned"), ("users=2,4", "cannot be tuned")]:
        with pytest.raises(TuneError, match=message):
            parse_grid([bad])
    with pytest.raises(TuneError, match="given twice"):
        parse_grid(["retrieval.k=1", "retrieval.k=2"])


def test_objective_is_the_methods_the_grid_acts_on():
    methods = ("none", "rag", "oppu", "oppu+rag")
    assert objective_methods(methods, ["user_train.lr", "user_peft.r"]) == ["oppu", "oppu+rag"]
    assert objective_methods(methods, ["retrieval.k"]) == list(methods)
    with pytest.raises(TuneError, match="no method uses one"):
        objective_methods(("none", "rag"), ["user_train.lr"])


def test_choice_follows_the_metric_direction_and_breaks_ties_by_grid_order():
    points = [Point({"x": 1}, "a", 0.5, 4), Point({"x": 2}, "b", 0.75, 4), Point({"x": 3}, "c", 0.75, 4)]
    assert choose(points, lower_is_better=False).run_id == "b"
    assert choose(points, lower_is_better=True).run_id == "a"
    scores = pd.DataFrame({"method": ["none", "oppu", "oppu", "oppu+rag"], "score": [1.0, 0.0, 1.0, 1.0]})
    assert point_score(scores, ["oppu", "oppu+rag"]) == (pytest.approx(2 / 3), 3)


def test_oppu_tune_runs_the_grid_on_validation_and_writes_a_preset(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                  capsys):
    out = tmp_path / "tuned.json"
    db = tmp_path / "r.duckdb"
    args = ["tune", "--grid", "user_train.lr=1e-3,5e-2", "--out", str(out), "--task", "LaMP_2M",
            "--methods", "none,oppu", "--user-ids", "alice,bob", "--validation-items", "2", "--epochs", "1",
            "--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--db", str(db),
            "--artifacts", str(tmp_path / "art"), "--no-adapt", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "user_train.lr=0.001:" in printed and "user_train.lr=0.05:" in printed and "chosen on the validation" \
        in printed
    preset = json.loads(out.read_text())
    record = preset["_chosen_on"]
    assert record["split"] == "validation" and record["users"] == ["alice", "bob"]
    assert [p["values"]["user_train.lr"] for p in record["points"]] == [1e-3, 5e-2]
    best = max(record["points"], key=lambda p: p["score"])  # accuracy: higher is better; ties go to the first
    if record["points"][0]["score"] == record["points"][1]["score"]:
        best = record["points"][0]
    assert record["chosen"] == best["values"] and preset["user_train"]["lr"] == best["values"]["user_train.lr"]

    from oppu.store import Store

    store = Store(db)
    runs = store.runs()
    assert set(runs["run_id"]) == {p["run_id"] for p in record["points"]}
    for run_id in runs["run_id"]:
        stored = json.loads(runs.loc[runs.run_id == run_id, "config"].iloc[0])
        assert stored["split"] == "validation"
        # only held-out history was answered: no test query id appears in the store
        assert store.scores([run_id])["query_id"].str.startswith("val:").all()

    # the file is a preset: `--preset path` applies it and says how it was chosen
    assert load_preset(str(out))["user_train"]["lr"] == best["values"]["user_train.lr"]
    assert preset_chosen_on(str(out))["task"] == "LaMP_2M"
    assert build_config(str(out)).user_train.lr == best["values"]["user_train.lr"]


def test_tune_refuses_a_bad_grid_before_any_run(tmp_path, capsys):
    assert main(["tune", "--grid", "user_train.nope=1,2", "--out", str(tmp_path / "t.json")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_a_preset_path_that_is_not_a_preset_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_preset(str(bad))
    with pytest.raises(ValueError, match="unknown preset 'nothere'"):
        load_preset("nothere")


def test_a_report_on_a_tuned_preset_says_which_split_chose_what(tmp_path):
    from oppu.report import TUNING_STATEMENT, customized, get_preset, plan, tuning_statement

    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({
        "_chosen_on": {"split": "validation", "validation_items": 4, "task": "LaMP_2M", "users": ["a", "b"],
                       "objective": "mean official accuracy of oppu", "chosen": {"user_train.lr": 0.002},
                       "command": "oppu tune --grid user_train.lr=1e-3,2e-3"},
        "users": 2, "user_train": {"lr": 0.002}}))
    assert tuning_statement(None) == TUNING_STATEMENT
    statement = tuning_statement(str(tuned))
    assert "user_train.lr=0.002 chosen on the validation split of LaMP_2M (2 users" in statement
    assert "4 most recent history items" in statement and "No choice was made on test queries" in statement
    runs, _ = plan(customized(get_preset("tiny"), run_preset=str(tuned)))
    assert runs and all(r.cfg.user_train.lr == 0.002 for r in runs)
    with pytest.raises(ValueError, match="unknown preset"):
        customized(get_preset("tiny"), run_preset=str(tmp_path / "missing.json"))
