"""oppu.lamp_import: reading, grouping, converting, validating and locating the official LaMP files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oppu.data import Item, TaskData
from oppu.lamp_import import (
    LampQuestion,
    convert_lamp,
    group_questions,
    lamp_urls,
    read_lamp,
    validate_path,
)

FIXTURES = Path(__file__).parent / "fixtures" / "lamp"
QUESTIONS = FIXTURES / "LaMP_2M_dev_questions.json"
OUTPUTS = FIXTURES / "LaMP_2M_dev_outputs.json"
OUTPUTS_BARE = FIXTURES / "LaMP_2M_dev_outputs_bare.json"
LEAKY = FIXTURES / "LaMP_2M_leaky_questions.json"
LEAKY_OUTPUTS = FIXTURES / "LaMP_2M_leaky_outputs.json"
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# -- official LaMP files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("outputs", [OUTPUTS, OUTPUTS_BARE])
def test_read_lamp_accepts_both_gold_shapes_and_reports_dirty_records(outputs):
    questions, problems = read_lamp("LaMP_2M", QUESTIONS, outputs)
    assert [q.id for q in questions] == ["600", "601", "110", "700", "701"]
    assert {q.id: q.gold for q in questions}["700"] == "romance"
    assert [i.id for i in questions[4].profile] == ["8003"]
    text = "\n".join(str(p) for p in problems)
    assert "question 110: input does not have the LaMP_2M wording" in text
    assert "missing field(s) tag" in text and "'horror' is not a LaMP_2M label" in text
    assert "record 5" in text


def test_group_questions_joins_questions_sharing_profile_items():
    a = LampQuestion("1", "x", (Item("i1", {}), Item("i2", {})))
    b = LampQuestion("2", "x", (Item("i2", {}), Item("i3", {})))
    c = LampQuestion("3", "x", (Item("i9", {}),))
    d = LampQuestion("4", "x", ())
    e = LampQuestion("5", "x", (Item("i3", {}), Item("i9", {})))  # bridges {1, 2} and {3}
    assert [[q.id for q in g] for g in group_questions([a, b, c, d])] == [["1", "2"], ["3"], ["4"]]
    assert [[q.id for q in g] for g in group_questions([a, b, c, d, e])] == [["1", "2", "3", "5"], ["4"]]


def test_convert_lamp_fixture(tmp_path):
    data = convert_lamp("LaMP_2M", QUESTIONS, OUTPUTS, tmp_path, test_users=2)
    assert isinstance(data, TaskData) and data.source == str(tmp_path / "LaMP_2M")
    user = data.user("600")  # named after its first question
    assert [q.id for q in user.queries] == ["600", "601"] and [q.gold for q in user.queries] == ["sci-fi", "action"]
    assert [i.id for i in user.history] == ["6000", "6001", "6002"]
    assert [u.id for u in data.test_users] == ["600", "110"]  # largest histories: 3 and 1 (tie 110 < 701 by id)
    assert {u.id for u in data.train_users} == {"700", "701"}
    assert data.user("700").history == ()
    assert any("question 110" in p.record for p in data.problems)


def test_convert_lamp_on_generated_lamp_files_recovers_the_users(tmp_path):
    from data.generate import build_task, write_lamp

    questions, outputs = write_lamp("LaMP_2M", tmp_path / "lamp")
    data = convert_lamp("LaMP_2M", questions, outputs, tmp_path / "out", test_users=24)
    assert data.problems == ()
    train, test = build_task("LaMP_2M")
    expected = {tuple(q.id for q in u.queries): (tuple(i.id for i in u.history), tuple(q.gold for q in u.queries))
                for u in (*train, *test)}
    got = {tuple(q.id for q in u.queries): (tuple(i.id for i in u.history), tuple(q.gold for q in u.queries))
           for u in (*data.train_users, *data.test_users)}
    assert got == expected
    sizes = [len(u.history) for u in data.test_users]
    assert sizes == sorted(sizes, reverse=True) and min(sizes) >= max(len(u.history) for u in data.train_users)


def test_convert_without_outputs_keeps_queries_unlabelled(tmp_path):
    data = convert_lamp("LaMP_2M", QUESTIONS, None, tmp_path, test_users=10)
    assert all(q.gold is None for u in data.test_users for q in u.queries)


def test_validate_path_on_folder_file_and_clean_data(tmp_path):
    assert validate_path(DEMO / "LaMP_2M") == []
    problems = validate_path(QUESTIONS)  # task guessed from the item fields
    assert any("question 110" in p.record for p in problems)
    assert validate_path(tmp_path / "nothing")[0].record == "-"
    broken = _write(tmp_path / "x.json", "[1, 2")
    broken.write_text("[1, 2")
    assert "truncated" in validate_path(broken, "LaMP_3")[0].message


def test_lamp_urls_follow_the_official_layout():
    urls = lamp_urls("LaMP_2M")
    assert urls["dev_questions.json"] == "https://ciir.cs.umass.edu/downloads/LaMP/LaMP_2/new/dev/dev_questions.json"
    assert lamp_urls("LaMP_2N", "http://m/")["train_outputs.json"] == "http://m/LaMP_2/train/train_outputs.json"


def test_convert_drops_history_items_that_are_a_querys_own_document(tmp_path):
    # One author's two questions; the later profile grew by the earlier question's own movie (item 9002, spaced
    # differently) with its gold tag.
    data = convert_lamp("LaMP_2M", LEAKY, LEAKY_OUTPUTS, tmp_path, test_users=1)
    user = data.user("900")
    assert [q.id for q in user.queries] == ["900", "901"]
    assert [i.id for i in user.history] == ["9000", "9003"]  # 9002 is question 900's movie with its gold tag
    assert data.leaks_dropped == 1


def test_convert_drops_history_items_carrying_a_generation_gold(tmp_path):
    headline = "Generate a headline for the following article: "
    questions = [
        {"id": "1", "input": headline + "Markets fell sharply today.",
         "profile": [{"id": "10", "text": "a", "title": "b"}]},
        {"id": "2", "input": headline + "Rain all week.",
         "profile": [{"id": "10", "text": "a", "title": "b"},
                     {"id": "11", "text": "Another story about stocks.", "title": "Stocks Tumble"}]},
    ]
    golds = [{"id": "1", "output": "stocks tumble"}, {"id": "2", "output": "Wet week"}]
    data = convert_lamp("LaMP_4", _write(tmp_path / "q.json", questions), _write(tmp_path / "o.json", golds),
                        tmp_path / "out")
    assert [i.id for i in data.user("1").history] == ["10"] and data.leaks_dropped == 1


def test_convert_keeps_clean_histories_whole(tmp_path):
    data = convert_lamp("LaMP_2M", QUESTIONS, OUTPUTS, tmp_path, test_users=2)
    assert data.leaks_dropped == 0
