"""Runs you can work with: the runs table shows the knobs that differ, two runs compare side by side, tags and
notes are kept, a run is deleted with everything it produced after a confirmation, and any run copies as a CLI
command that rebuilds its config."""

from __future__ import annotations

from pathlib import Path

from test_pages import page, populate, texts

from oppu import runs as core
from oppu.store import Store


def _two_runs(env, tiny_task_data):
    db = Path(env["OPPU_DB"])
    populate(db, tiny_task_data, "run-k1", k=1)
    populate(db, tiny_task_data, "run-k4", k=4, peft="ia3")
    adapters = Path(env["OPPU_ARTIFACTS"]) / "adapters" / "LaMP_2M" / "run-k4" / "alice" / "plain"
    adapters.mkdir(parents=True)
    (adapters / "adapter_model.safetensors").write_bytes(b"\0")
    return db, adapters


def test_runs_table_has_a_column_per_differing_knob_only(env, tiny_task_data):
    db, _ = _two_runs(env, tiny_task_data)
    table = core.runs_table(Store(db).runs())
    assert set(table["run_id"]) == {"run-k1", "run-k4"}
    assert "k" in table.columns and "PEFT" in table.columns
    assert "epochs" not in table.columns  # the same in both runs: not a column


def test_cli_command_rebuilds_the_same_config(env, tiny_task_data):
    import argparse
    import shlex

    from oppu.commands.run import config_from_args, configure
    from oppu.config import RunConfig

    cfg = RunConfig(task="LaMP_2M", users=3, methods=("none", "oppu"), tag="k sweep", task_adaptation=False,
                    data_dir=str(env["OPPU_DATA"]))
    cfg = cfg.replace(retrieval=cfg.retrieval.__class__(retriever="bm25", k=4))
    command, missing = core.cli_command(cfg.to_dict())
    assert command.startswith("oppu run ") and "--k 4" in command and "--no-adapt" in command
    parser = argparse.ArgumentParser()
    configure(parser)
    rebuilt = config_from_args(parser.parse_args(shlex.split(command)[2:]))
    assert rebuilt == cfg and missing == []


def test_runs_page_compares_tags_notes_and_deletes_after_confirmation(env, tiny_task_data):
    db, adapters = _two_runs(env, tiny_task_data)
    at = page("runs")
    assert not at.exception
    at.multiselect(key="runs-chosen").set_value(["run-k1", "run-k4"]).run()
    assert not at.exception
    side = at.dataframe[1].value
    assert "retrieval.k" in side.index and "task" not in side.index  # only differences
    at.toggle(key="runs-only-diff").set_value(False).run()
    assert "task" in at.dataframe[1].value.index
    assert any("oppu run" in c.value and "--k 4" in c.value for c in at.code)
    at.text_input(key="runs-tag-run-k1").set_value("baseline")
    at.text_area(key="runs-note-run-k1").set_value("the k=1 reference")
    next(b for b in at.button if b.key == "runs-save-run-k1").click().run()
    assert Store(db).runs().set_index("run_id").loc["run-k1", "tag"] == "baseline"
    assert core.read_notes(db) == {"run-k1": "the k=1 reference"}
    delete = next(b for b in at.button if b.key == "runs-delete-run-k4")
    assert delete.disabled  # not before the confirmation
    at.checkbox(key="runs-sure-run-k4").check().run()
    next(b for b in at.button if b.key == "runs-delete-run-k4").click().run()
    assert "Deleted `run-k4`" in texts(at)
    assert set(Store(db).runs()["run_id"]) == {"run-k1"} and Store(db).prediction_count("run-k4") == 0
    assert not adapters.exists()


def test_a_stored_runs_training_curves_are_named_by_stage_style_and_user(env, tiny_task_data):
    """The Runs page draws a finished run's stored curves: task adaptation by its style (never `__task__`), each
    user's adapter per style as its own line."""
    from test_pages import plotly_charts, values

    db, _ = _two_runs(env, tiny_task_data)
    store = Store(db)
    store.add_train_curve("run-k1", "__task__", "adapt:plain", [(1, 3.0), (2, 2.5)])
    store.add_train_curve("run-k1", "__task__", "adapt:rag-k1", [(1, 3.2), (2, 2.7)])
    store.add_train_curve("run-k1", "alice", "oppu:plain", [(1, 2.0), (2, 1.5), (3, 1.2)])
    store.add_train_curve("run-k1", "alice", "oppu:rag-k1", [(1, 2.1), (2, 1.7)])
    at = page("runs")
    at.multiselect(key="runs-chosen").set_value(["run-k1"]).run()
    assert not at.exception
    figures = plotly_charts(at)
    names = {trace.name for fig in figures for trace in fig.data}
    assert names >= {"task adaptation (plain)", "task adaptation (rag-k1)", "alice (plain)", "alice (rag-k1)"}
    assert not any("__task__" in n for n in names)
    alice = next(t for fig in figures for t in fig.data if t.name == "alice (plain)")
    assert values(alice.x) == [1, 2, 3] and values(alice.y) == [2.0, 1.5, 1.2]  # one user and style: one line
