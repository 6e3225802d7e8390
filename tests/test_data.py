"""Records, readers and writers of oppu.data (the OPPU per-user layout) on fixtures, dirty records and the demo."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from oppu.data import (
    DataError,
    Item,
    Query,
    UnknownUserError,
    User,
    load_task_data,
    read_golds,
    write_oppu,
)

OUTPUTS = Path(__file__).parent / "fixtures" / "lamp" / "LaMP_2M_dev_outputs.json"
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def _user(uid: str, n: int, gold: str | None = "comedy", profile: str | None = None) -> User:
    items = tuple(Item(f"{uid}-{i}", {"description": f"film {i} of {uid} ☕", "tag": "comedy"}, "2020-01-01")
                  for i in range(n))
    return User(uid, items, (Query(f"{uid}-q", "tags: [] description: a new film", gold, "2021-02-02"),), profile)


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# -- records ---------------------------------------------------------------------------------------------------

def test_records_are_immutable_and_do_not_alias_input():
    fields = {"description": "d", "tag": "comedy"}
    item = Item("1", fields)
    fields["tag"] = "action"
    assert item.fields["tag"] == "comedy"
    with pytest.raises(TypeError):
        item.fields["tag"] = "x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        item.id = "2"  # type: ignore[misc]
    assert hash(item) == hash(Item("1", {"tag": "comedy", "description": "d"}))
    user = User("u", [item], [])  # lists become tuples
    assert isinstance(user.history, tuple) and isinstance(user.queries, tuple)


# -- OPPU layout: write -> load round trip ---------------------------------------------------------------------

def test_write_then_load_round_trips_with_golds_profiles_and_unicode(tmp_path):
    train = (_user("o1", 3, profile="likes 東京 films"),)
    test = (_user("t1", 5, profile="prefers comedy"), _user("t2", 2))
    folder = write_oppu("LaMP_2M", train, test, tmp_path)
    assert folder == tmp_path / "LaMP_2M"
    raw_test = json.loads((folder / "user_top_100_history.json").read_text(encoding="utf-8"))
    assert all("gold" not in q for u in raw_test for q in u["query"])  # golds live only in the label file
    data = load_task_data(tmp_path, "LaMP_2M")
    assert data.problems == ()
    assert data.test_users == test and data.train_users == train
    assert data.user("t2").profile_text is None and data.user("o1").profile_text == "likes 東京 films"
    assert [u.id for u in data.most_active(1)] == ["t1"]
    assert len(data.fingerprint) == 16 and data.fingerprint == load_task_data(folder, "LaMP_2M").fingerprint


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    write_oppu("LaMP_2M", (), (_user("t1", 2),), tmp_path)
    before = load_task_data(tmp_path, "LaMP_2M").fingerprint
    write_oppu("LaMP_2M", (), (_user("t1", 3),), tmp_path)
    assert load_task_data(tmp_path, "LaMP_2M").fingerprint != before


def test_unknown_user_error_names_close_ids(tmp_path):
    write_oppu("LaMP_2M", (), (_user("alice", 1), _user("alicia", 1)), tmp_path)
    data = load_task_data(tmp_path, "LaMP_2M")
    with pytest.raises(UnknownUserError, match="alice"):
        data.user("alise")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    write_oppu("LaMP_3", (), (_user_rating := User("u", (Item("1", {"text": "ok", "score": "4"}),), ()),),
               tmp_path)
    assert sorted(p.name for p in (tmp_path / "LaMP_3").iterdir()) == [
        "user_others.json", "user_top_100_history.json", "user_top_100_history_label.json"]
    assert load_task_data(tmp_path, "LaMP_3").test_users == (_user_rating,)


def test_missing_task_folder_is_a_data_error_with_a_fix(tmp_path):
    with pytest.raises(DataError, match="data.generate|convert"):
        load_task_data(tmp_path, "LaMP_2M")


# -- dirty records and bad files --------------------------------------------------------------------------------

def test_dirty_records_are_reported_and_skipped(tmp_path):
    folder = tmp_path / "LaMP_3"
    _write(folder / "user_top_100_history.json", [
        {"user_id": 1, "profile": [{"id": 5, "text": "good", "score": 5}, {"id": "6", "text": "x", "score": "9"},
                                   {"id": "7", "text": None, "score": "3"}, {"id": 8.5, "text": "y", "score": "2"},
                                   {"id": "9", "text": "z", "score": "1", "date": "yesterday"}],
         "query": [{"id": "q1", "input": "review: fine"}, {"id": "q1", "input": "dup"}, {"id": "q2"}]},
        {"user_id": "1", "profile": [], "query": []},
        {"profile": []}, "junk", {"user_id": "2", "profile": {"not": "a list"}, "query": []},
    ])
    _write(folder / "user_top_100_history_label.json", [{"id": "q1", "output": "4"}, {"id": "ghost", "output": "1"}])
    data = load_task_data(tmp_path, "LaMP_3")
    user = data.user("1")
    assert [i.id for i in user.history] == ["5", "9"]
    assert user.history[0].fields["score"] == "5" and user.history[1].date is None
    assert [(q.id, q.gold) for q in user.queries] == [("q1", "4")]
    assert [u.id for u in data.test_users] == ["1", "2"]
    text = "\n".join(str(p) for p in data.problems)
    for expected in ("'9' is not a LaMP_3 label", "field 'text' is NoneType", "item id 8.5", "not an ISO date",
                     "duplicate query id", "input is missing", "duplicate user id", "user_id None",
                     "user is a str", "profile is a dict", "gold for a query no test user asks"):
        assert expected in text, expected
    assert all(p.fix for p in data.problems)


@pytest.mark.parametrize("content, message", [
    (b"[{\"user_id\": \"1\", \"profile\": [", "truncated"),
    (b"{not json", "malformed at line 1"),
    ("[]".encode("utf-16"), "not UTF-8"),
    (b"{\"a\": 1}", "expected a list"),
    (b"[" * 100000, "JSON"),
])
def test_bad_whole_files_raise_one_line_data_errors(tmp_path, content, message):
    (tmp_path / "LaMP_2M").mkdir()
    (tmp_path / "LaMP_2M" / "user_top_100_history.json").write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_task_data(tmp_path, "LaMP_2M")
    assert "\n" not in str(err.value) and "user_top_100_history.json" in str(err.value)


def test_utf8_bom_is_accepted(tmp_path):
    (tmp_path / "LaMP_7").mkdir()
    body = json.dumps([{"user_id": "u", "profile": [{"id": "1", "text": "héllo 🎉"}], "query": []}])
    (tmp_path / "LaMP_7" / "user_top_100_history.json").write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_task_data(tmp_path, "LaMP_7").user("u").history[0].fields["text"] == "héllo 🎉"


def test_huge_profile_and_huge_input_load(tmp_path):
    items = [{"id": str(i), "text": f"tweet number {i}"} for i in range(50_000)]
    big_input = "Paraphrase the following tweet without any explanation before or after it: " + "x " * 500_000
    _write(tmp_path / "LaMP_7" / "user_top_100_history.json",
           [{"user_id": "big", "profile": items, "query": [{"id": "q", "input": big_input}]}])
    user = load_task_data(tmp_path, "LaMP_7").user("big")
    assert len(user.history) == 50_000 and len(user.queries[0].input) > 1_000_000


def test_profile_files_by_position_and_length_mismatch_reported(tmp_path):
    write_oppu("LaMP_2M", (), (_user("a", 1), _user("b", 1)), tmp_path)
    _write(tmp_path / "LaMP_2M" / "profile_user_100.json", [{"output": "profile of a"}])
    data = load_task_data(tmp_path, "LaMP_2M")
    assert data.user("a").profile_text == "profile of a" and data.user("b").profile_text is None
    assert any("1 profiles for 2 users" in p.message for p in data.problems)


# -- gold files ------------------------------------------------------------------------------------------------

def test_read_golds_rejects_golds_of_another_task():
    with pytest.raises(DataError, match="not LaMP_3"):
        read_golds(OUTPUTS, "LaMP_3")


# -- the embedded demo ------------------------------------------------------------------------------------------

def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.json"))}


def test_demo_data_is_exactly_what_the_generator_produces(tmp_path):
    from data.generate import generate

    generate(tmp_path)
    assert _tree_hashes(tmp_path) == _tree_hashes(DEMO), "data/demo is stale: run `python -m data.generate`"


@pytest.mark.parametrize("task_id", ["LaMP_1", "LaMP_2N", "LaMP_2M", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7"])
def test_demo_data_shape_and_no_gold_leaks(task_id):
    from oppu.tasks import get_task

    task = get_task(task_id)
    data = load_task_data(DEMO, task_id)
    assert data.problems == () and len(data.test_users) == 24 and len(data.train_users) == 40
    sizes = sorted((len(u.history) for u in data.test_users), reverse=True)
    assert sizes[0] == 300 and sizes[-1] <= 6 and sizes[3] < 100  # wide spread, moderate top four
    for user in (*data.test_users, *data.train_users):
        assert 4 <= len(user.queries) <= 8 and all(q.gold for q in user.queries)
        texts = [v for item in user.history for v in item.fields.values()]
        last = max(i.date for i in user.history)
        for q in user.queries:
            assert q.date > last  # queries come after the history
            assert task.query_text(q.input) not in texts
            if task.kind == "generation":
                assert not any(q.gold in t for t in texts)
            else:
                assert q.gold in task.labels


def test_demo_personal_patterns_need_the_users_history():
    """LaMP_2M: the same kind of film gets different tags from different users (a generic answer cannot win)."""
    from data.generate import FILMS

    data = load_task_data(DEMO, "LaMP_2M")
    tags_per_family: dict[str, set[str]] = {}
    for user in data.test_users:
        for q in user.queries:
            text = data and q.input
            family = next(f for f, spec in FILMS.items() if any(role in text for role in spec["role"]))
            tags_per_family.setdefault(family, set()).add(q.gold)
    assert all(len(tags) >= 2 for tags in tags_per_family.values())
