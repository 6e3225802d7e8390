"""Bad input at every entry point: readers, `oppu data validate`, `oppu run`, `oppu evaluate`, `oppu jobs submit`.

Table-driven: each row of DATA_CASES corrupts one file of an otherwise valid LaMP_2M task folder, each row of
EVAL_CASES one predictions/golds pair, each row of CLI_CASES one command line. For every row the product must
answer with a short message naming the file or record (and a fix), exit non-zero from the CLI, print no
traceback, and leave the results store, the adapters and the jobs folder byte-for-byte as they were.
(Random bytes are fuzzed in test_fuzz_inputs.py; these rows are the named, realistic failures.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from oppu.data import DataError, load_task_data
from oppu.tasks import get_task

from .conftest import oppu

TASK = get_task("LaMP_2M")
TEST_FILE, LABEL_FILE = "user_top_100_history.json", "user_top_100_history_label.json"


def _item(i: int, **over) -> dict:
    return {"id": f"p{i}", "description": f"a film about space and ships number {i}", "tag": "comedy",
            "date": "2020-01-01", **over}


def _users(**over) -> list[dict]:
    users = [{"user_id": "u1", "profile": [_item(1), _item(2), _item(3)],
              "query": [{"id": "q1", "input": TASK.make_input("a film about space")}]},
             {"user_id": "u2", "profile": [_item(4), _item(5)],
              "query": [{"id": "q2", "input": TASK.make_input("a film about love")}]}]
    users[0].update(over)
    return users


def _golds(*pairs) -> dict:
    return {"task": "LaMP_2M", "golds": [{"id": i, "output": o} for i, o in (pairs or (("q1", "comedy"),
                                                                                     ("q2", "action")))]}


def _json(value) -> bytes:
    return json.dumps(value).encode()


VALID = _json(_users())


@dataclass(frozen=True)
class Case:
    """One corrupted file. kind: `fatal` (the whole file is refused), `problem` (the record is reported and
    skipped, loading goes on) or `ok` (accepted as data). `says` must appear in the message."""

    file: str
    content: bytes
    kind: str
    says: str
    check: Callable | None = None
    labels: bytes | None = None
    """Content of the label file when the case needs its own (e.g. golds for numeric query ids)."""


def _big_profile() -> bytes:
    return _json(_users(profile=[_item(i) for i in range(50_000)]))


def _huge_input() -> bytes:
    return _json(_users(query=[{"id": "q1", "input": TASK.make_input("space " * 175_000)}]))  # ~1 MB


DATA_CASES: dict[str, Case] = {
    # whole files that cannot be used
    "truncated": Case(TEST_FILE, VALID[: len(VALID) // 2], "fatal", "re-download"),
    "truncated-at-end": Case(TEST_FILE, VALID[:-2], "fatal", "truncated"),
    "malformed-json": Case(TEST_FILE, VALID.replace(b'"profile":', b'"profile"', 1), "fatal", "line 1"),
    "empty-file": Case(TEST_FILE, b"", "fatal", TEST_FILE),
    "non-utf8": Case(TEST_FILE, VALID.replace(b"space", b"sp\xffce", 1), "fatal", "UTF-8"),
    "top-level-object": Case(TEST_FILE, _json({"users": _users()}), "fatal", "expected a list"),
    "top-level-string": Case(TEST_FILE, _json("users"), "fatal", "expected a list"),
    "deep-nesting": Case(TEST_FILE, b"[" * 200_000 + b"]" * 200_000, "fatal", TEST_FILE),
    "labels-truncated": Case(LABEL_FILE, _json(_golds())[:20], "fatal", LABEL_FILE),
    "labels-other-task": Case(LABEL_FILE, _json({"task": "LaMP_3", "golds": []}), "fatal", "LaMP_3"),
    "labels-not-golds": Case(LABEL_FILE, _json({"task": "LaMP_2M"}), "fatal", "golds"),
    # dirty records: reported by name, skipped
    "user-not-object": Case(TEST_FILE, _json([1, *_users()]), "problem", "record 0"),
    "missing-user-id": Case(TEST_FILE, _json([{"profile": [], "query": []}, *_users()]), "problem", "user_id"),
    "user-id-float": Case(TEST_FILE, _json([{"user_id": 1.5, "profile": []}, *_users()]), "problem", "1.5"),
    "user-id-null": Case(TEST_FILE, _json([{"user_id": None}, *_users()]), "problem", "user_id"),
    "user-id-list": Case(TEST_FILE, _json([{"user_id": ["u9"]}, *_users()]), "problem", "user_id"),
    "duplicate-user": Case(TEST_FILE, _json([*_users(), _users()[0]]), "problem", "duplicate user"),
    "duplicate-query": Case(TEST_FILE, _json(_users(query=[{"id": "q1", "input": "x"}] * 2)), "problem",
                            "duplicate query"),
    "duplicate-item": Case(TEST_FILE, _json(_users(profile=[_item(1), _item(1)])), "problem", "duplicate item"),
    "item-missing-field": Case(TEST_FILE, _json(_users(profile=[{"id": "p1", "tag": "comedy"}])), "problem",
                               "description"),
    "item-field-list": Case(TEST_FILE, _json(_users(profile=[_item(1, description=["a"])])), "problem",
                            "description"),
    "item-unknown-label": Case(TEST_FILE, _json(_users(profile=[_item(1, tag="western")])), "problem",
                               "western"),
    "item-without-id": Case(TEST_FILE, _json(_users(profile=[{"description": "d", "tag": "comedy"}])),
                            "problem", "item id"),
    "item-not-object": Case(TEST_FILE, _json(_users(profile=["text"])), "problem", "not an object"),
    "profile-is-object": Case(TEST_FILE, _json(_users(profile={"p1": _item(1)})), "problem", "not a list"),
    "query-without-input": Case(TEST_FILE, _json(_users(query=[{"id": "q1"}])), "problem", "input"),
    "query-input-number": Case(TEST_FILE, _json(_users(query=[{"id": "q1", "input": 7}])), "problem", "input"),
    "query-not-list": Case(TEST_FILE, _json(_users(query="q1")), "problem", "not a list"),
    "bad-date": Case(TEST_FILE, _json(_users(profile=[_item(1, date="yesterday")])), "problem", "ISO date"),
    "gold-not-a-label": Case(LABEL_FILE, _json(_golds(("q1", "western"), ("q2", "action"))), "problem",
                             "western"),
    "gold-unknown-query": Case(LABEL_FILE, _json(_golds(("q1", "comedy"), ("q2", "action"), ("q9", "comedy"))),
                               "problem", "gold q9"),
    "gold-missing": Case(LABEL_FILE, _json(_golds(("q1", "comedy"))), "problem", "query q2"),
    "gold-duplicate": Case(LABEL_FILE, _json(_golds(("q1", "comedy"), ("q1", "action"), ("q2", "action"))),
                           "problem", "duplicate gold"),
    # accepted as data
    "numeric-ids": Case(TEST_FILE, _json([{"user_id": 12, "profile": [_item(1, id=6001)],
                                           "query": [{"id": 600, "input": "x"}]}]), "ok", "",
                        lambda d: d.user("12").history[0].id == "6001" and d.user("12").queries[0].gold == "comedy",
                        labels=_json({"task": "LaMP_2M", "golds": [{"id": 600, "output": "comedy"}]})),
    "empty-profile": Case(TEST_FILE, _json(_users(profile=[])), "ok", "",
                          lambda d: d.user("u1").history == ()),
    "profile-50k-items": Case(TEST_FILE, _big_profile(), "ok", "", lambda d: len(d.user("u1").history) == 50_000),
    "input-1MB": Case(TEST_FILE, _huge_input(), "ok", "",
                      lambda d: len(d.user("u1").queries[0].input) > 1_000_000),
}


def _task_root(tmp_path: Path, case: Case) -> Path:
    root = tmp_path / "data"
    folder = root / "LaMP_2M"
    folder.mkdir(parents=True)
    (folder / TEST_FILE).write_bytes(VALID)
    (folder / LABEL_FILE).write_bytes(case.labels or _json(_golds()))
    (folder / case.file).write_bytes(case.content)
    return root


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_reader(name, tmp_path):
    case = DATA_CASES[name]
    root = _task_root(tmp_path, case)
    if case.kind == "fatal":
        with pytest.raises(DataError) as err:
            load_task_data(root, "LaMP_2M")
        message = str(err.value)
        assert "\n" not in message and case.file in message and case.says in message, message
        return
    data = load_task_data(root, "LaMP_2M")
    texts = [str(p) for p in data.problems]
    assert all("\n" not in t and "(fix: " in t for t in texts), texts
    if case.kind == "problem":
        assert any(case.file in t and case.says in t for t in texts), texts
        assert data.user("u2").queries  # the good records around the bad one are kept
    else:
        assert case.check(data)
        assert not [t for t in texts if TEST_FILE in t], texts


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_cli_data_validate(name, tmp_path):
    case = DATA_CASES[name]
    folder = _task_root(tmp_path, case) / "LaMP_2M"
    result = oppu("data", "validate", folder)
    assert "Traceback" not in result.stderr, result.stderr
    if case.kind == "ok":
        assert result.rc == 0, result.stdout + result.stderr
        return
    assert result.rc == 1
    lines = result.stdout.splitlines()
    assert any(case.file in line and case.says in line for line in lines), result.stdout


FATAL = [n for n, c in DATA_CASES.items() if c.kind == "fatal"]


@pytest.mark.parametrize("name", FATAL)
def test_cli_run_refuses_unusable_data_and_changes_nothing(name, tmp_path, state):
    case = DATA_CASES[name]
    root = _task_root(tmp_path, case)
    before = state.fingerprint()
    result = oppu("run", "--task", "LaMP_2M", "--data", root, "--db", state.db, "--artifacts", state.artifacts,
                  "--users", "1", "--quiet")
    assert result.rc != 0
    message = result.one_line_error()
    assert case.file in message and len(message.strip().splitlines()) == 1, message
    assert state.fingerprint() == before


def _params(names, known_bugs: dict[str, str]):
    """Case names as pytest params; a case that shows a reported bug is a strict xfail until it is fixed."""
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=known_bugs[n] + " — reported"))
            if n in known_bugs else n for n in names]


# -- `oppu run` / `oppu jobs submit` option errors: refused before anything is loaded or written ----------------
OPTION_CASES = {
    "unknown-task": (["--task", "LaMP_9"], "LaMP_9"),
    "task-lowercase": (["--task", "lamp_2m"], "lamp_2m"),
    "unknown-method": (["--methods", "none,magic"], "magic"),
    "no-methods": (["--methods", ","], "no methods"),
    "negative-k": (["--k", "-1"], "k must be"),
    "huge-k": (["--k", "100000"], "k must be"),
    "zero-users": (["--users", "0"], "users must be"),
    "zero-epochs": (["--epochs", "0"], "epochs"),
    "bad-lr": (["--lr", "5"], "learning rate"),
    "bad-peft": (["--peft", "adapterx"], "adapterx"),
    "bad-retriever": (["--retriever", "google"], "google"),
    "bad-history-format": (["--history-format", "xml"], "history_format"),
    "unknown-preset": (["--preset", "../../etc/passwd"], "preset"),
}


OPTION_BUGS: dict[str, str] = {}  # none open; a newly found one goes here as case -> reason


@pytest.mark.parametrize("case", _params([f"{n}-{c}" for n in OPTION_CASES for c in ("run", "jobs submit")],
                                         OPTION_BUGS))
def test_cli_options_are_refused_in_one_line(case, tmp_path, state):
    name, command = case.rsplit("-", 1)
    argv, says = OPTION_CASES[name]
    base = ["--data", "data/demo", "--db", state.db, "--artifacts", state.artifacts]
    if command == "jobs submit":
        base = ["--root", state.jobs, *base]
    before = state.fingerprint()
    result = oppu(*command.split(), *base, *argv)
    assert result.rc != 0
    assert says in result.one_line_error()
    assert state.fingerprint() == before


def test_cli_run_unknown_user_names_close_ids(tmp_path, state):
    root = _task_root(tmp_path, Case(TEST_FILE, VALID, "ok", ""))
    before = state.fingerprint()
    result = oppu("run", "--task", "LaMP_2M", "--data", root, "--db", state.db, "--artifacts", state.artifacts,
                  "--user-ids", "u1x", "--quiet")
    assert result.rc == 2
    message = result.one_line_error()
    assert "u1x" in message and "u1" in message  # the close id is suggested
    assert state.fingerprint() == before


@pytest.mark.parametrize("argv", [["--user-ids", "nosuchuser"], ["--data", "/nonexistent/data"]])
def test_cli_jobs_submit_checks_users_and_data_before_queueing(argv, tmp_path, state):
    root = _task_root(tmp_path, Case(TEST_FILE, VALID, "ok", ""))
    before = state.fingerprint()
    result = oppu("jobs", "submit", "--root", state.jobs, "--task", "LaMP_2M", "--data", root, "--db", state.db,
                  *argv)
    assert result.rc != 0
    result.one_line_error()
    assert state.fingerprint() == before


# -- `oppu evaluate` ------------------------------------------------------------------------------------------
GOLDS = _json({"task": "LaMP_2M", "golds": [{"id": "1", "output": "comedy"}, {"id": "2", "output": "action"}]})
PREDS = _json([{"id": "1", "output": "comedy"}, {"id": "2", "output": "comedy"}])

EVAL_CASES: dict[str, tuple[bytes, bytes, str]] = {
    # name: (golds, preds, the message must contain)
    "preds-truncated": (GOLDS, PREDS[:-5], "preds.json"),
    "preds-empty": (GOLDS, b"", "preds.json"),
    "preds-non-utf8": (GOLDS, PREDS.replace(b"comedy", b"com\xe9dy", 1), "UTF-8"),
    "preds-a-string": (GOLDS, _json("comedy"), "preds.json"),
    "preds-a-number": (GOLDS, b"42", "preds.json"),
    "preds-missing-id": (GOLDS, _json([{"id": "1", "output": "comedy"}]), "without a prediction"),
    "preds-extra-id": (GOLDS, _json([*json.loads(PREDS), {"id": "3", "output": "x"}]), "without a gold"),
    "preds-other-ids": (GOLDS, _json([{"id": "a", "output": "x"}, {"id": "b", "output": "y"}]), "without a gold"),
    "preds-duplicate-id": (GOLDS, _json([*json.loads(PREDS), {"id": "1", "output": "x"}]), "twice"),
    "preds-missing-output": (GOLDS, _json([{"id": "1"}, {"id": "2", "output": "x"}]), '"output"'),
    "preds-record-not-object": (GOLDS, _json(["comedy", "action"]), '"id"'),
    "preds-other-task": (GOLDS, _json({"task": "LaMP_3", "golds": json.loads(PREDS)}), "LaMP_3"),
    "golds-malformed": (GOLDS.replace(b":", b"", 1), PREDS, "golds.json"),
    "golds-other-task": (_json({"task": "LaMP_4", "golds": []}), PREDS, "LaMP_4"),
    "golds-deep-nesting": (b"[" * 200_000 + b"]" * 200_000, PREDS, "golds.json"),
    "golds-missing-file": (b"", PREDS, "golds.json"),
}


EVAL_BUGS: dict[str, str] = {}  # none open; a newly found one goes here as name -> reason


@pytest.mark.parametrize("name", _params(list(EVAL_CASES), EVAL_BUGS))
def test_cli_evaluate(name, tmp_path):
    golds, preds, says = EVAL_CASES[name]
    golds_path, preds_path = tmp_path / "golds.json", tmp_path / "preds.json"
    if name != "golds-missing-file":
        golds_path.write_bytes(golds)
    preds_path.write_bytes(preds)
    result = oppu("evaluate", "--task", "LaMP_2M", "--golds", golds_path, "--preds", preds_path)
    assert result.rc != 0 and result.stdout == ""
    message = result.one_line_error()
    assert says in message and len(message.strip().splitlines()) == 1, message


def test_cli_evaluate_numeric_ids_match_string_ids(tmp_path):
    """LaMP ids are strings, but a predictions file written with numbers must still line up."""
    (tmp_path / "g.json").write_bytes(GOLDS)
    (tmp_path / "p.json").write_bytes(_json([{"id": 1, "output": "comedy"}, {"id": 2, "output": "action"}]))
    result = oppu("evaluate", "--task", "LaMP_2M", "--golds", tmp_path / "g.json", "--preds", tmp_path / "p.json")
    assert result.rc == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] == 1.0


def test_cli_unknown_command_and_task():
    for argv, says in ((["trian"], "trian"), (["evaluate", "--task", "LaMP_6", "--golds", "g", "--preds", "p"],
                                              "LaMP_6")):
        result = oppu(*argv)
        assert result.rc == 2 and says in result.one_line_error()
