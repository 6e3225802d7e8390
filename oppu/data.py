"""Typed, immutable records of LaMP data and the OPPU per-user layout: reading, checking and writing task folders.

Scope: the records (`Item`, `Query`, `User`, `TaskData`, `Problem`), the shared parsing of items, queries and gold
files, and the OPPU files of one task folder (`user_others.json`, `user_top_100_history*.json`, PAG profiles).
The official LaMP question/output files (reading, grouping into users, converting, downloading, validating) live in
`oppu.lamp_import`, which builds on this module. Nothing here imports heavy libraries or mutates what it read.
Rules (documented in data/README.md):
- Ids are strings. JSON integers are accepted as ids and turned into their decimal string silently (they are
  unambiguous); any other type (float, bool, null, list...) is a dirty record.
- A dirty record (missing field, wrong type, unknown label, duplicate id) becomes a `Problem` naming the file, the
  record, what is wrong and how to fix it, and is skipped; loading goes on.
- A bad whole file (unreadable, not UTF-8, malformed or truncated JSON, wrong top-level type) raises `DataError`
  with a one-line message naming the file and the fix.
- Field values must be strings; numbers (a LaMP_3 score of 5) are turned into strings ("5").
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

from oppu.errors import OppuError
from oppu.paths import atomic_folder, write_json_atomic
from oppu.tasks import Task, as_task

OTHERS_FILE = "user_others.json"
TEST_FILE = "user_top_100_history.json"
LABEL_FILE = "user_top_100_history_label.json"
TEST_PROFILE_FILE = "profile_user_100.json"
OTHERS_PROFILE_FILE = "profile_user_others.json"

_ISO_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?([T ][\d:.+\-Z]*)?$")
_RESERVED_ITEM_KEYS = ("id", "date")


class DataError(OppuError, ValueError):
    """A whole file or folder cannot be used; the one-line message names it and says how to fix it."""


class UnknownUserError(OppuError, KeyError):
    """A user id that the loaded data does not contain; the message names close ids."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown user"


@dataclass(frozen=True)
class Problem:
    """One dirty record that was reported and skipped (or, for a whole file, the reason it was unusable)."""

    file: str
    record: str
    """Which record: `user 12`, `user 12 item 6001`, `query 600`, or `-` for the whole file."""
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: {self.message} (fix: {self.fix})"


# -- records -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One history item of a user."""

    id: str
    fields: Mapping[str, str]
    """Read-only; every value a string (scores "1".."5" too)."""
    date: str | None = None
    """ISO date when known."""

    def __post_init__(self) -> None:
        if not isinstance(self.fields, MappingProxyType):
            object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))

    def __hash__(self) -> int:
        return hash((self.id, tuple(sorted(self.fields.items())), self.date))

    def to_json(self) -> dict[str, str]:
        record = {"id": self.id, **self.fields}
        if self.date is not None:
            record["date"] = self.date
        return record


@dataclass(frozen=True)
class Query:
    """One question asked for a user; `gold` is None when the answer is unknown (an unlabelled test split)."""

    id: str
    input: str
    gold: str | None = None
    date: str | None = None


@dataclass(frozen=True)
class User:
    """A user: their history (training data of their own adapter, retrieval corpus) and their queries."""

    id: str
    history: tuple[Item, ...]
    queries: tuple[Query, ...]
    profile_text: str | None = None
    """PAG profile from the OPPU profile files, when present."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "history", tuple(self.history))
        object.__setattr__(self, "queries", tuple(self.queries))


@dataclass(frozen=True)
class TaskData:
    """Everything loaded for one task folder."""

    task: str
    train_users: tuple[User, ...]
    """`user_others`: task adaptation."""
    test_users: tuple[User, ...]
    """The most active users: personal adapters."""
    problems: tuple[Problem, ...]
    """Dirty records that were reported and skipped."""
    source: str
    fingerprint: str
    """sha256 of the files read (16 hex chars): changes whenever the data does."""

    @cached_property
    def _by_id(self) -> dict[str, User]:
        return {u.id: u for u in (*self.train_users, *self.test_users)}

    def user(self, user_id: str) -> User:
        """The user with this id (test or train); raises UnknownUserError naming close ids."""
        found = self._by_id.get(str(user_id))
        if found is None:
            close = difflib.get_close_matches(str(user_id), list(self._by_id), n=3)
            hint = f"; close ids: {', '.join(close)}" if close else ""
            raise UnknownUserError(f"no user {user_id!r} in {self.source} ({len(self._by_id)} users){hint}")
        return found

    def most_active(self, n: int) -> tuple[User, ...]:
        """The `n` test users with the longest history (ties broken by id, so the choice is stable)."""
        ranked = sorted(self.test_users, key=lambda u: (-len(u.history), u.id))
        return tuple(ranked[: max(0, n)])


# -- low-level reading ---------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike[str]) -> tuple[Any, bytes]:
    """(parsed JSON, raw bytes) of a file; any unusable file raises DataError with a one-line fix."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path (or generate/convert the data first)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check permissions and the path") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); re-save the file as UTF-8") \
            from None
    try:
        return json.loads(text), raw
    except json.JSONDecodeError as exc:
        where = "ends early (truncated?)" if exc.pos >= len(text.rstrip()) else \
            f"malformed at line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise DataError(f"{path}: JSON {where}; re-download or re-generate the file") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read; the file is not LaMP data") from None


def id_of(value: Any) -> str | None:
    """A record id as a string, or None when it is unusable (see the module docstring for the rule)."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _text_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    return None


class ProblemSink:
    """Collects the problems of one file."""

    def __init__(self, file: str | os.PathLike[str]):
        self.file = str(file)
        self.problems: list[Problem] = []

    def add(self, record: str, message: str, fix: str) -> None:
        self.problems.append(Problem(self.file, record, message, fix))


def expect_list(data: Any, path: Path, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise DataError(f"{path}: top level is a JSON {type(data).__name__}, expected a list of {what}; "
                        "is this the right file?")
    return data


def parse_item(raw: Any, task: Task, sink: ProblemSink, where: str) -> Item | None:
    """One history item, or None (with a problem recorded) when it is dirty."""
    if not isinstance(raw, dict):
        sink.add(where, f"item is a {type(raw).__name__}, not an object", "make each profile item a JSON object")
        return None
    item_id = id_of(raw.get("id"))
    if item_id is None:
        sink.add(where, f"item id {raw.get('id')!r} is missing or not a string", 'give every item a string "id"')
        return None
    where = f"{where} item {item_id}"
    fields: dict[str, str] = {}
    for key, value in raw.items():
        if key in _RESERVED_ITEM_KEYS:
            continue
        text = _text_of(value)
        if text is None:
            if key in task.profile_fields:
                sink.add(where, f"field {key!r} is {type(value).__name__}, not text", f"make {key!r} a string")
                return None
            sink.add(where, f"extra field {key!r} is {type(value).__name__}; dropped", f"make {key!r} a string")
            continue
        fields[str(key)] = text
    missing = [f for f in task.profile_fields if f not in fields]
    if missing:
        sink.add(where, f"missing field(s) {', '.join(missing)} for {task.id}",
                 f"{task.id} items need {', '.join(task.profile_fields)}")
        return None
    if task.labels and task.target_field in task.profile_fields and fields[task.target_field].strip() not in \
            task.labels:
        sink.add(where, f"{task.target_field} {fields[task.target_field]!r} is not a {task.id} label",
                 f"use one of: {', '.join(task.labels)}")
        return None
    return Item(item_id, fields, _date_of(raw.get("date"), sink, where))


def _date_of(value: Any, sink: ProblemSink, where: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and _ISO_DATE.match(value.strip()):
        return value.strip()
    sink.add(where, f"date {value!r} is not an ISO date; ignored", "write dates as YYYY-MM-DD")
    return None


def parse_history(raw: Any, task: Task, sink: ProblemSink, where: str) -> tuple[Item, ...]:
    if not isinstance(raw, list):
        sink.add(where, f"profile is a {type(raw).__name__}, not a list; treated as empty",
                 "make the profile a JSON list of items")
        return ()
    items: list[Item] = []
    seen: set[str] = set()
    for raw_item in raw:
        item = parse_item(raw_item, task, sink, where)
        if item is None:
            continue
        if item.id in seen:
            sink.add(f"{where} item {item.id}", "duplicate item id; later copy skipped", "give items unique ids")
            continue
        seen.add(item.id)
        items.append(item)
    return tuple(items)


def _parse_gold(value: Any, task: Task, sink: ProblemSink, where: str) -> tuple[bool, str | None]:
    """(ok, gold) of one gold value; a label task's gold must be one of its labels."""
    if value is None:
        return True, None
    gold = _text_of(value)
    if gold is None:
        sink.add(where, f"gold is {type(value).__name__}, not text", "make the gold a string")
        return False, None
    if task.labels and gold.strip() not in task.labels:
        sink.add(where, f"gold {gold!r} is not a {task.id} label", f"use one of: {', '.join(task.labels)}")
        return False, None
    return True, gold


def _parse_queries(raw: Any, task: Task, sink: ProblemSink, where: str, seen: set[str]) -> tuple[Query, ...]:
    if not isinstance(raw, list):
        sink.add(where, f"query is a {type(raw).__name__}, not a list; treated as empty",
                 "make `query` a JSON list")
        return ()
    queries: list[Query] = []
    for q in raw:
        if not isinstance(q, dict):
            sink.add(where, f"query is a {type(q).__name__}, not an object", "make each query a JSON object")
            continue
        qid = id_of(q.get("id"))
        if qid is None:
            sink.add(where, f"query id {q.get('id')!r} is missing or not a string", 'give each query a string "id"')
            continue
        qwhere = f"{where} query {qid}"
        if qid in seen:
            sink.add(qwhere, "duplicate query id; later copy skipped", "query ids must be unique in a task")
            continue
        if not isinstance(q.get("input"), str) or not q["input"].strip():
            sink.add(qwhere, "input is missing, empty or not text", "give each query a non-empty string input")
            continue
        ok, gold = _parse_gold(q.get("gold", q.get("output")), task, sink, qwhere)
        if not ok:
            continue
        seen.add(qid)
        queries.append(Query(qid, q["input"], gold, _date_of(q.get("date"), sink, qwhere)))
    return tuple(queries)


def read_users(path: str | os.PathLike[str], task: Task | str, seen_queries: set[str] | None = None,
               ) -> tuple[tuple[User, ...], list[int], tuple[Problem, ...], bytes]:
    """Users of one OPPU per-user file: (users, their index in the file, problems, raw bytes)."""
    task = as_task(task)
    path = Path(path)
    data, raw = read_json(path)
    records = expect_list(data, path, "users ({user_id, profile, query})")
    sink = ProblemSink(path)
    seen_queries = set() if seen_queries is None else seen_queries
    users: list[User] = []
    positions: list[int] = []
    seen_users: set[str] = set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            sink.add(f"record {index}", f"user is a {type(record).__name__}, not an object",
                     "make each user a JSON object with user_id, profile and query")
            continue
        uid = id_of(record.get("user_id"))
        if uid is None:
            sink.add(f"record {index}", f"user_id {record.get('user_id')!r} is missing or not a string",
                     'give each user a string "user_id"')
            continue
        where = f"user {uid}"
        if uid in seen_users:
            sink.add(where, "duplicate user id; later copy skipped", "user ids must be unique in a file")
            continue
        seen_users.add(uid)
        history = parse_history(record.get("profile", []), task, sink, where)
        queries = _parse_queries(record.get("query", []), task, sink, where, seen_queries)
        users.append(User(uid, history, queries))
        positions.append(index)
    return tuple(users), positions, tuple(sink.problems), raw


def read_golds(path: str | os.PathLike[str], task: Task | str | None = None,
               ) -> tuple[dict[str, str], tuple[Problem, ...], bytes]:
    """Golds of an outputs/label file: `{"task", "golds": [...]}` or a bare list of `{"id", "output"}`."""
    task = None if task is None else as_task(task)
    path = Path(path)
    data, raw = read_json(path)
    if isinstance(data, dict):
        if "golds" not in data:
            raise DataError(f'{path}: object without a "golds" list; expected {{"task": ..., "golds": [...]}}')
        declared = data.get("task")
        if task is not None and isinstance(declared, str) and declared not in (task.id, task.id.replace("_", "-")) \
                and not (task.id.startswith("LaMP_2") and declared.startswith("LaMP_2")):
            raise DataError(f"{path}: golds of task {declared!r}, not {task.id}; pass the matching --task or file")
        data = data["golds"]
    records = expect_list(data, path, 'golds ({"id", "output"})')
    sink = ProblemSink(path)
    golds: dict[str, str] = {}
    for index, record in enumerate(records):
        gid = id_of(record.get("id")) if isinstance(record, dict) else None
        if gid is None:
            sink.add(f"record {index}", "gold without a usable string id", 'write golds as {"id": "...", "output": "..."}')
            continue
        if gid in golds:
            sink.add(f"gold {gid}", "duplicate gold id; later copy skipped", "keep one gold per id")
            continue
        if task is None:
            gold = _text_of(record.get("output"))
            ok = gold is not None
            if not ok:
                sink.add(f"gold {gid}", "output is missing or not text", "give each gold a string output")
        else:
            ok, gold = _parse_gold(record.get("output"), task, sink, f"gold {gid}")
            if ok and gold is None:
                sink.add(f"gold {gid}", "output is missing", "give each gold a string output")
                ok = False
        if ok:
            golds[gid] = gold
    return golds, tuple(sink.problems), raw


def _read_profiles(path: Path, users: Sequence[User], positions: Sequence[int],
                   ) -> tuple[dict[str, str], tuple[Problem, ...], bytes]:
    """PAG profiles by user id: entries may name their `user_id`, else they follow the users file's order."""
    data, raw = read_json(path)
    records = expect_list(data, path, 'profiles ({"output": text})')
    sink = ProblemSink(path)
    by_position = {pos: u.id for u, pos in zip(users, positions)}
    profiles: dict[str, str] = {}
    for index, record in enumerate(records):
        text = record.get("output") if isinstance(record, dict) else None
        if not isinstance(text, str):
            sink.add(f"record {index}", "profile without a string output", 'write {"output": "profile text"}')
            continue
        uid = id_of(record.get("user_id")) or by_position.get(index)
        if uid is not None and text.strip():
            profiles[uid] = text
    if len(records) != len({*by_position}) and not any(isinstance(r, dict) and "user_id" in r for r in records):
        sink.add("-", f"{len(records)} profiles for {len(by_position)} users; matched by position",
                 "write one profile per user, in the users file's order (or add user_id to each)")
    return profiles, tuple(sink.problems), raw


# -- the OPPU per-user layout --------------------------------------------------------------------------------


def task_dir(data_dir: str | os.PathLike[str], task: Task | str) -> Path:
    """The folder holding a task's files: DATA_DIR/<task id>/, or DATA_DIR itself when it is that folder."""
    task = as_task(task)
    root = Path(data_dir)
    if (root / task.id).is_dir():
        return root / task.id
    if (root / TEST_FILE).is_file():
        return root
    raise DataError(f"{root / task.id}: no {task.id} data here; run `python -m data.generate` for the demo or "
                    f"`oppu data convert --task {task.id} ...` for real LaMP data")


def load_task_data(data_dir: str | os.PathLike[str], task: Task | str) -> TaskData:
    """Read a task folder in the OPPU per-user layout. Dirty records are reported in `problems` and skipped."""
    task = as_task(task)
    folder = task_dir(data_dir, task)
    digest = hashlib.sha256()
    problems: list[Problem] = []
    seen_queries: set[str] = set()

    def take(name: str, raw: bytes, found: Iterable[Problem]) -> None:
        digest.update(name.encode() + b"\0" + hashlib.sha256(raw).digest())
        problems.extend(found)

    test, test_pos, found, raw = read_users(folder / TEST_FILE, task, seen_queries)
    take(TEST_FILE, raw, found)
    train: tuple[User, ...] = ()
    train_pos: list[int] = []
    if (folder / OTHERS_FILE).is_file():
        train, train_pos, found, raw = read_users(folder / OTHERS_FILE, task, seen_queries)
        take(OTHERS_FILE, raw, found)
    if (folder / LABEL_FILE).is_file():
        golds, found, raw = read_golds(folder / LABEL_FILE, task)
        take(LABEL_FILE, raw, found)
        test = _attach_golds(test, golds, folder / LABEL_FILE, problems)
    for name, users, positions in ((TEST_PROFILE_FILE, test, test_pos), (OTHERS_PROFILE_FILE, train, train_pos)):
        if (folder / name).is_file():
            profiles, found, raw = _read_profiles(folder / name, users, positions)
            take(name, raw, found)
            users = tuple(_with_profile(u, profiles.get(u.id)) for u in users)
            test, train = (users, train) if name == TEST_PROFILE_FILE else (test, users)
    return TaskData(task.id, train, test, tuple(problems), str(folder), digest.hexdigest()[:16])


def _with_profile(user: User, profile: str | None) -> User:
    return user if profile is None else User(user.id, user.history, user.queries, profile)


def _attach_golds(users: Sequence[User], golds: Mapping[str, str], file: Path,
                  problems: list[Problem]) -> tuple[User, ...]:
    sink = ProblemSink(file)
    asked = {q.id for u in users for q in u.queries}
    for gid in sorted(set(golds) - asked):
        sink.add(f"gold {gid}", "gold for a query no test user asks; ignored", "remove it or add the query")
    out = []
    for u in users:
        queries = []
        for q in u.queries:
            gold = golds.get(q.id, q.gold)
            if gold is None:
                sink.add(f"user {u.id} query {q.id}", "no gold for this query; it cannot be scored",
                         f"add its gold to {LABEL_FILE}")
            queries.append(Query(q.id, q.input, gold, q.date))
        out.append(User(u.id, u.history, tuple(queries), u.profile_text))
    problems.extend(sink.problems)
    return tuple(out)


def _user_json(user: User, with_gold: bool) -> dict[str, Any]:
    queries = []
    for q in user.queries:
        record: dict[str, Any] = {"id": q.id, "input": q.input}
        if with_gold and q.gold is not None:
            record["gold"] = q.gold
        if q.date is not None:
            record["date"] = q.date
        queries.append(record)
    return {"user_id": user.id, "profile": [item.to_json() for item in user.history], "query": queries}


def write_oppu(task: Task | str, train_users: Sequence[User], test_users: Sequence[User],
               out_dir: str | os.PathLike[str]) -> Path:
    """Write one task folder in the OPPU layout into `out_dir/<task id>/`; returns that folder.

    Test users' golds go to the label file, never inline; profile files are written when any user has one.
    """
    task = as_task(task)
    folder = Path(out_dir) / task.id
    # The files belong together (users, golds, profiles): they are written into a sibling folder and swapped in
    # as a whole, so a failure half-way (a full disk) leaves the previous task folder whole, never a mix of both.
    with atomic_folder(folder) as staging:
        write_json_atomic(staging / OTHERS_FILE, [_user_json(u, with_gold=True) for u in train_users])
        write_json_atomic(staging / TEST_FILE, [_user_json(u, with_gold=False) for u in test_users])
        golds = [{"id": q.id, "output": q.gold} for u in test_users for q in u.queries if q.gold is not None]
        write_json_atomic(staging / LABEL_FILE, {"task": task.id, "golds": golds})
        for name, users in ((TEST_PROFILE_FILE, test_users), (OTHERS_PROFILE_FILE, train_users)):
            if any(u.profile_text for u in users):
                write_json_atomic(staging / name,
                                  [{"user_id": u.id, "output": u.profile_text or ""} for u in users])
    return folder
