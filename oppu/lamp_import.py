"""The official LaMP files: reading `*_questions.json` / `*_outputs.json`, grouping questions into users,
converting them to the OPPU per-user layout, downloading them, and validating any data file or folder.

Scope: everything that knows the official LaMP shape (one record per question, each carrying its author's
profile, no user ids). The records, the item/gold parsing and the OPPU layout it converts into are
`oppu.data`'s; this module only builds on them. Kept apart from `oppu.data` because nothing that trains or
evaluates needs it: runs read OPPU task folders only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oppu.data import (
    TEST_FILE,
    DataError,
    Item,
    Problem,
    ProblemSink,
    Query,
    TaskData,
    User,
    expect_list,
    id_of,
    load_task_data,
    parse_history,
    read_golds,
    read_json,
    read_users,
    write_oppu,
)
from oppu.tasks import TASKS, Task, as_task


@dataclass(frozen=True)
class LampQuestion:
    """One record of an official LaMP `*_questions.json` file, with its gold when an outputs file was given."""

    id: str
    input: str
    profile: tuple[Item, ...]
    gold: str | None = None


# -- the official LaMP files ---------------------------------------------------------------------------------


def read_lamp(task: Task | str, questions: str | os.PathLike[str], outputs: str | os.PathLike[str] | None = None,
              ) -> tuple[tuple[LampQuestion, ...], tuple[Problem, ...]]:
    """Records of a LaMP `*_questions.json` (+ optional `*_outputs.json`, either gold shape)."""
    task = as_task(task)
    path = Path(questions)
    data, _ = read_json(path)
    records = expect_list(data, path, "questions ({id, input, profile})")
    sink = ProblemSink(path)
    golds: dict[str, str] = {}
    gold_problems: tuple[Problem, ...] = ()
    if outputs is not None:
        golds, gold_problems, _ = read_golds(outputs, task)
    out: list[LampQuestion] = []
    seen: set[str] = set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            sink.add(f"record {index}", f"question is a {type(record).__name__}", "make each question an object")
            continue
        qid = id_of(record.get("id"))
        if qid is None or qid in seen:
            sink.add(f"record {index}", f"question id {record.get('id')!r} is missing, not a string or repeated",
                     'give each question a unique string "id"')
            continue
        where = f"question {qid}"
        if not isinstance(record.get("input"), str) or not record["input"].strip():
            sink.add(where, "input is missing, empty or not text", "give the question a string input")
            continue
        if task.markers and not any(m in record["input"] for m in task.markers) or \
                (task.id == "LaMP_1" and task.parse(record["input"]) is None):
            # Kept (the whole input becomes the query text) but reported: real LaMP has such records.
            sink.add(where, f"input does not have the {task.id} wording; the whole input is used as query text",
                     "check the record; nothing to do if it is a known dirty LaMP record")
        seen.add(qid)
        history = parse_history(record.get("profile", []), task, sink, where)
        if outputs is not None and qid not in golds:
            sink.add(where, "no gold in the outputs file; kept without gold", "add its gold or drop the question")
        out.append(LampQuestion(qid, record["input"], history, golds.get(qid)))
    return tuple(out), (*sink.problems, *gold_problems)


def group_questions(questions: Sequence[LampQuestion]) -> list[list[LampQuestion]]:
    """Group LaMP questions by user: two questions belong to one user when their profiles share an item id.

    LaMP gives no user ids; each question carries its author's profile. A profile item id names one document of
    one author, so shared ids mean the same author (in the time-based split a later question's profile grows
    the earlier one's). Connected components of that relation are the users; a question with an empty
    profile is a user of its own.
    """
    parent = list(range(len(questions)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for index, question in enumerate(questions):
        for item in question.profile:
            if item.id in owner:
                a, b = find(owner[item.id]), find(index)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[item.id] = index
    groups: dict[int, list[LampQuestion]] = {}
    for index, question in enumerate(questions):
        groups.setdefault(find(index), []).append(question)
    return [groups[root] for root in sorted(groups)]


def _same_text(text: str | None) -> str:
    """Text as leak checks compare it: whitespace runs collapsed, case folded ("" for nothing)."""
    return " ".join((text or "").split()).casefold()


def leaks(task: Task, item: Item, queries: Sequence[Query]) -> bool:
    """Whether a history item gives away one of the user's own queries, so it must not be trained on or retrieved.

    Grouping merges the profiles of one author's questions, and in LaMP's time-based split a later question's
    profile can hold an earlier question itself. An item leaks when it is a query's own document (its source
    text equals the text the query is asked about, the text retrieval matches: LaMP_2M description, LaMP_4
    article, LaMP_1 paper title...), which carries the query's answer as its label, or, for generation tasks,
    when its answer field equals a query's gold (the gold headline, title or tweet in the history). A shared
    class label alone is no leak: most items of a classification user share labels with the queries.
    """
    source = _same_text(item.fields.get(task.source_field))
    target = _same_text(item.fields.get(task.target_field))
    for query in queries:
        if source and source == _same_text(task.retrieval_query(query.input, instruction=False)):
            return True
        if task.kind == "generation" and target and target == _same_text(query.gold):
            return True
    return False


def _user_of(task: Task, group: Sequence[LampQuestion]) -> tuple[User, int]:
    """The user of one group of questions, and how many items of its merged profile were dropped as leaks."""
    merged: dict[str, Item] = {}
    for question in group:
        for item in question.profile:
            merged.setdefault(item.id, item)
    queries = tuple(Query(q.id, q.input, q.gold) for q in group)
    history = tuple(item for item in merged.values() if not leaks(task, item, queries))
    # LaMP has no user ids: a user is named after its first question's id, which is unique and stable.
    return User(group[0].id, history, queries), len(merged) - len(history)


@dataclass(frozen=True)
class ConvertedData(TaskData):
    """What `convert_lamp` wrote (as `load_task_data` reads it back) and what the conversion left out."""

    leaks_dropped: int = 0
    """History items dropped because they were one of the user's queries' own document or gold (see `leaks`)."""


def convert_lamp(task: Task | str, questions: str | os.PathLike[str], outputs: str | os.PathLike[str] | None,
                 out_dir: str | os.PathLike[str], test_users: int = 100) -> ConvertedData:
    """Official LaMP files -> OPPU layout in `out_dir/<task id>/`: the `test_users` users with the largest
    history are test users, the others `user_others`. Every query keeps its id; history items that leak one of
    the user's queries are dropped and counted. Returns the written data."""
    task = as_task(task)
    if test_users < 1:
        raise DataError(f"test_users must be >= 1 (got {test_users}); pass e.g. --test-users 100")
    records, problems = read_lamp(task, questions, outputs)
    if not records:
        raise DataError(f"{questions}: no usable {task.id} question; check the file and --task")
    converted = [_user_of(task, group) for group in group_questions(records)]
    users = [user for user, _ in converted]
    ranked = sorted(users, key=lambda u: (-len(u.history), u.id))
    folder = write_oppu(task, ranked[test_users:], ranked[:test_users], out_dir)
    loaded = load_task_data(out_dir, task)
    return ConvertedData(loaded.task, loaded.train_users, loaded.test_users, (*problems, *loaded.problems),
                         str(folder), loaded.fingerprint, leaks_dropped=sum(dropped for _, dropped in converted))


# -- validation ----------------------------------------------------------------------------------------------


def guess_task(fields: Iterable[str]) -> Task | None:
    """The task whose item fields best match `fields` (most required fields present), or None."""
    keys = set(fields)
    candidates = [t for t in TASKS.values() if set(t.profile_fields) <= keys]
    return max(candidates, key=lambda t: len(t.profile_fields), default=None)


def _task_for(path: Path, task: Task | str | None) -> Task:
    if task is not None:
        return as_task(task)
    for part in (path.name, path.parent.name):
        if part in TASKS:
            return TASKS[part]
    sample = _first_item(path)
    guessed = guess_task(sample) if sample is not None else None
    if guessed is None:
        raise DataError(f"{path}: cannot tell which task this is; pass --task (one of {', '.join(TASKS)})")
    return guessed


def _first_item(path: Path) -> dict[str, Any] | None:
    target = path / TEST_FILE if path.is_dir() else path
    try:
        data, _ = read_json(target)
    except DataError:
        return None
    for record in data if isinstance(data, list) else []:
        profile = record.get("profile") if isinstance(record, dict) else None
        for item in profile if isinstance(profile, list) else []:
            if isinstance(item, dict):
                return item
    return None


def validate_path(path: str | os.PathLike[str], task: Task | str | None = None) -> list[Problem]:
    """Every problem of a task folder, a data folder of task folders, or one JSON file; [] when clean."""
    path = Path(path)
    try:
        if path.is_dir() and not (path / TEST_FILE).is_file():
            folders = [p for p in sorted(path.iterdir()) if p.is_dir() and (p / TEST_FILE).is_file()]
            if not folders:
                raise DataError(f"{path}: no task folder ({TEST_FILE}) here; pass a task folder or a JSON file")
            return [p for folder in folders for p in validate_path(folder, task)]
        resolved = _task_for(path, task)
        if path.is_dir():
            return list(load_task_data(path, resolved).problems)
        return _validate_file(path, resolved)
    except DataError as exc:
        return [Problem(str(path), "-", str(exc), "see the message")]


def _validate_file(path: Path, task: Task) -> list[Problem]:
    data, _ = read_json(path)
    sample = data[0] if isinstance(data, list) and data else None
    if isinstance(data, dict) or (isinstance(sample, dict) and "output" in sample and "input" not in sample):
        return list(read_golds(path, task)[1])
    if isinstance(sample, dict) and "user_id" in sample:
        return list(read_users(path, task)[2])
    return list(read_lamp(task, path)[1])


# -- downloading the official files --------------------------------------------------------------------------

LAMP_BASE_URL = "https://ciir.cs.umass.edu/downloads/LaMP/"
# Where each task lives in the official download tree: movie tagging is the re-released LaMP_2 under `new/`,
# news categorisation the original LaMP_2.
_LAMP_FOLDERS = {"LaMP_1": "LaMP_1/", "LaMP_2N": "LaMP_2/", "LaMP_2M": "LaMP_2/new/", "LaMP_3": "LaMP_3/",
                 "LaMP_4": "LaMP_4/", "LaMP_5": "LaMP_5/", "LaMP_7": "LaMP_7/"}
LAMP_SPLITS = ("train", "dev")


def lamp_urls(task: Task | str, base_url: str = LAMP_BASE_URL) -> dict[str, str]:
    """File name -> official URL of a task's labelled splits (`train_questions.json`, `dev_outputs.json`, ...)."""
    task = as_task(task)
    base = base_url if base_url.endswith("/") else base_url + "/"
    return {f"{split}_{kind}.json": f"{base}{_LAMP_FOLDERS[task.id]}{split}/{split}_{kind}.json"
            for split in LAMP_SPLITS for kind in ("questions", "outputs")}


def download_lamp(task: Task | str, out_dir: str | os.PathLike[str], base_url: str = LAMP_BASE_URL,
                  timeout: float = 60.0) -> list[Path]:
    """Download a task's official train/dev files into `out_dir/<task id>/`; DataError when unreachable."""
    import urllib.error
    import urllib.request

    task = as_task(task)
    folder = Path(out_dir) / task.id
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, url in lamp_urls(task, base_url).items():
        target = folder / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, out, length=1 << 20)
            os.replace(tmp, target)
        except urllib.error.HTTPError as exc:
            raise DataError(f"{url}: HTTP {exc.code} {exc.reason}; check --base-url and the task id") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DataError(f"{url}: cannot download ({reason}); check the internet connection, or download the "
                            f"files by hand into {folder}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        written.append(target)
    return written
