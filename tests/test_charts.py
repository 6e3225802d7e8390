"""The dashboard's pure builders: plotly figures (dashboard/charts.py), tables (dashboard/tables.py) and adapter
folders (dashboard/adapter_files.py), tested without Streamlit."""

from __future__ import annotations

import json
import zipfile
from io import BytesIO

import pandas as pd
import pytest

from dashboard import adapter_files, charts, tables


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


# -- charts -----------------------------------------------------------------------------------------------------


def test_history_histogram_counts_every_user_and_marks_the_chosen_one():
    sizes = pd.DataFrame({"user_id": ["a", "b", "c", "d"], "history_size": [3, 10, 10, 42]})
    fig = charts.history_histogram(sizes, highlight_user="d")
    assert list(fig.data[0].x) == [3, 10, 10, 42]
    marks = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(marks) == 1 and marks[0].x0 == 42
    assert "user d: 42 items" in fig.layout.annotations[0].text


def test_history_histogram_without_a_known_user_draws_no_marker():
    sizes = pd.DataFrame({"user_id": ["a"], "history_size": [3]})
    assert not charts.history_histogram(sizes, highlight_user="zz").layout.shapes


def test_missing_column_names_the_column():
    with pytest.raises(charts.ChartDataError, match="'history_size'"):
        charts.history_histogram(pd.DataFrame({"user_id": ["a"]}))


def test_activity_curve_one_line_per_method_in_bin_order():
    df = pd.DataFrame({"bin": [2, 1, 2, 1], "history_min": [20, 3, 20, 3], "history_max": [40, 19, 40, 19],
                       "method": ["oppu", "oppu", "rag", "rag"], "score": [0.8, 0.5, 0.6, 0.55]})
    fig = charts.activity_curve(df, "accuracy")
    assert [t.name for t in fig.data] == ["OPPU", charts.method_label("rag")]  # OPPU first, then retrieval only
    oppu = _trace(fig, "OPPU")
    assert list(oppu.x) == ["3–19 items", "20–40 items"] and list(oppu.y) == [0.5, 0.8]
    assert "higher is better" in fig.layout.yaxis.title.text


def test_k_sweep_sorts_by_k_and_states_direction_for_errors():
    df = pd.DataFrame({"method": ["rag", "rag", "oppu+rag"], "k": [4, 1, 1], "score": [0.7, 0.9, 0.5]})
    fig = charts.k_sweep(df, "absolute error", lower_is_better=True)
    rag = _trace(fig, charts.method_label("rag"))
    assert list(rag.x) == [1, 4] and list(rag.y) == [0.9, 0.7]
    assert "lower is better" in fig.layout.yaxis.title.text


def test_grouped_bars_label_behaviour_shift_settings():
    df = pd.DataFrame({"history_cutoff": ["", "2020-01-01"], "method": ["oppu", "oppu"], "score": [0.6, 0.4]})
    fig = charts.behaviour_shift(df, "accuracy")
    assert list(fig.data[0].x) == ["full history", "items before 2020-01-01"]
    assert fig.layout.barmode == "group"


def test_peft_and_history_format_bars():
    peft = charts.peft_comparison(pd.DataFrame({"peft": ["lora", "ia3"], "method": ["oppu"] * 2,
                                                "score": [0.5, 0.4]}), "ROUGE-L")
    assert list(peft.data[0].x) == ["lora", "ia3"]
    fmt = charts.history_format(pd.DataFrame({"history_format": ["full", "text_only"], "method": ["rag"] * 2,
                                              "score": [0.3, 0.2]}), "ROUGE-L")
    assert list(fmt.data[0].y) == [0.3, 0.2]


def test_metric_bars_and_loss_curve():
    fig = charts.metric_bars(pd.DataFrame({"method": ["none", "oppu"], "metric": ["accuracy"] * 2,
                                           "value": [0.25, 0.5]}))
    assert [t.name for t in fig.data] == ["OPPU", "Non-personalized"]
    loss = charts.loss_curve(pd.DataFrame({"step": [2, 1, 1], "loss": [1.0, 2.0, 3.0], "user_id": ["a", "a", "b"]}))
    assert list(_trace(loss, "a").x) == [1, 2] and list(_trace(loss, "a").y) == [2.0, 1.0]
    assert loss.layout.showlegend is True


def test_sort_methods_puts_unknown_methods_last():
    assert charts.sort_methods(["none", "zzz", "rag", "oppu"]) == ["oppu", "rag", "none", "zzz"]


# -- tables -----------------------------------------------------------------------------------------------------


def _predictions():
    return pd.DataFrame({
        "query_id": ["q1", "q1", "q1", "q2", "q2", "q2"],
        "input": ["in 1"] * 3 + ["in 2"] * 3,
        "gold": ["comedy"] * 3 + ["action"] * 3,
        "method": ["none", "rag", "oppu"] * 2,
        "output": ["action", "comedy", "comedy", "action", "action", "action"],
        "correct": [0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    })


def test_side_by_side_one_row_per_query_oppu_and_rag_first():
    table = tables.side_by_side(_predictions(), "classification", methods_first=charts.METHOD_ORDER)
    assert list(table.columns) == ["query", "input", "gold", "OPPU", charts.method_label("rag"), "Non-personalized"]
    assert list(table["query"]) == ["q1", "q2"]
    first = table.iloc[0]
    assert first["OPPU"] == "✓ comedy" and first["Non-personalized"] == "✗ action" and first["gold"] == "comedy"
    assert "2B8A3E" in tables.mark_style(first["OPPU"]) and "C92A2A" in tables.mark_style(first["Non-personalized"])
    assert tables.mark_style("comedy") == ""


def test_side_by_side_shows_the_chosen_scoring():
    preds = _predictions().assign(output=["Action."] * 6, correct=[0.0] * 6,
                                  lenient_output=["action"] * 6, lenient_correct=[0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    official = tables.side_by_side(preds, "classification")
    assert official.iloc[1]["OPPU"] == "✗ Action."  # officially "Action." is no label
    lenient = tables.side_by_side(preds, "classification", scoring="lenient")
    assert lenient.iloc[1]["OPPU"] == "✓ action" and lenient.iloc[0]["OPPU"] == "✗ action"


def test_marks_for_ratings_and_generation():
    assert tables.mark("4", 1.0, "rating") == "✗ 4  (off by 1)"
    assert tables.mark("5", 0.0, "rating").startswith("✓")
    assert tables.mark("a title", 0.4167, "generation") == "a title  ·  ROUGE-L 0.42"
    assert tables.mark("x", None, "classification") == "x"


def test_user_sizes_and_history_frame(tiny_task_data):
    sizes = tables.user_sizes(tiny_task_data)
    assert list(sizes["history_size"]) == sorted(sizes["history_size"], reverse=True)
    assert set(sizes["split"]) == {"test", "train"}
    assert len(sizes) == len(tiny_task_data.train_users) + len(tiny_task_data.test_users)
    alice = tiny_task_data.user("alice")
    history = tables.history_frame(alice)
    assert len(history) == len(alice.history) and {"id", "date", "description", "tag"} <= set(history.columns)
    assert list(tables.queries_frame(alice)["gold"]) == [q.gold for q in alice.queries]


def test_duration():
    assert tables.duration(None) == "–"
    assert tables.duration(75) == "1m 15s"
    assert tables.duration(3 * 3600 + 120) == "3h 02m"


# -- adapter folders --------------------------------------------------------------------------------------------


def make_adapter(artifacts, task, run, user, style="plain", loss=0.5):
    """An adapter folder in the layout `oppu.experiment` writes: adapters/<task>/<run>/<user>/<style>/."""
    folder = artifacts / "adapters" / task / run / user / style
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 2048)
    (folder / "adapter_config.json").write_text("{}")
    manifest = {"user_id": user, "task": task, "run_id": run, "style": style, "methods": ["oppu"],
                "peft": {"kind": "lora", "r": 8, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "item_ids": ["a", "b", "c"], "item_count": 3, "final_loss": loss,
                "created": f"2024-01-0{len(user)}T00:00:00Z"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder.parent


def test_list_zip_and_delete_adapters(tmp_path):
    alice = make_adapter(tmp_path, "LaMP_2M", "run1", "alice", loss=0.25)
    make_adapter(tmp_path, "LaMP_2M", "run1", "bob")
    listed = adapter_files.list_adapters(tmp_path)
    assert sorted(listed["user_id"]) == ["alice", "bob"]
    row = listed[listed["user_id"] == "alice"].iloc[0]
    assert row["items"] == 3 and row["final_loss"] == 0.25 and row["peft"] == "lora r=8 α=8 on q_proj,v_proj"
    assert row["size_kib"] > 2 and row["task"] == "LaMP_2M" and row["run"] == "run1" and row["style"] == "plain"
    assert adapter_files.manifests(alice, tmp_path)["plain"]["final_loss"] == 0.25

    with zipfile.ZipFile(BytesIO(adapter_files.adapter_zip(alice, tmp_path))) as archive:
        assert sorted(archive.namelist()) == ["alice/README.md", "alice/base_model.json", "alice/load.py",
                                              "alice/plain/adapter_config.json",
                                              "alice/plain/adapter_model.safetensors", "alice/plain/manifest.json"]

    adapter_files.delete_adapter(alice, tmp_path)
    assert not alice.exists()
    assert list(adapter_files.list_adapters(tmp_path)["user_id"]) == ["bob"]


def test_delete_refuses_folders_that_are_not_a_users_adapters(tmp_path):
    outside = make_adapter(tmp_path / "elsewhere", "LaMP_2M", "r", "eve")
    with pytest.raises(adapter_files.AdapterFileError, match="not a user's adapter folder"):
        adapter_files.delete_adapter(outside, tmp_path / "artifacts")
    with pytest.raises(adapter_files.AdapterFileError):
        adapter_files.delete_adapter(tmp_path / "elsewhere" / "adapters", tmp_path / "elsewhere")
    assert outside.exists()


def test_empty_artifacts_folder_lists_nothing(tmp_path):
    assert adapter_files.list_adapters(tmp_path / "missing").empty


def test_peft_summary():
    assert adapter_files.peft_summary({"kind": "ia3", "target_modules": ["k_proj"]}) == "ia3 on k_proj"
    assert adapter_files.peft_summary({"kind": "prompt", "num_virtual_tokens": 16}).endswith("16 virtual tokens")
    assert adapter_files.peft_summary(None) == ""
