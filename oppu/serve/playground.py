"""The playground's core: one input of one user answered side by side by the methods of the paper's table
(non-personalized, RAG, OPPU, OPPU+RAG), each with the prompt it saw and the retrieved items it used.

Prompts are built exactly as the run built them (`oppu.examples.build_prompt` under the run's stored config and
`oppu.experiment.method_style`), from the user's history in the data folder; answers come from a `Service`
(the same engine as `oppu serve`): the methods without an adapter answer through the run's task-adapted base of
their prompt style, the OPPU methods through the user's adapter of that style. A method whose adapter the run
did not train is reported as unavailable rather than answered by something else. No Streamlit here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from oppu.errors import OppuError

PLAYGROUND_METHODS = ("none", "rag", "oppu", "oppu+rag")


class PlaygroundError(OppuError, ValueError):
    """The chosen run, user or input cannot be answered; the message says what to pick instead."""


@dataclass(frozen=True)
class Retrieved:
    item_id: str
    text: str
    score: float


@dataclass(frozen=True)
class Answer:
    method: str
    label: str
    model_id: str | None
    """The served model that answered (None: unavailable)."""
    prompt: str = ""
    answer: str = ""
    retrieved: tuple[Retrieved, ...] = ()
    profile: str | None = None
    note: str = ""
    """Why a method is unavailable."""


@dataclass(frozen=True)
class RunUsers:
    """A run with personal adapters and the users that have them (newest run first in `runs`)."""

    run_id: str
    task: str
    users: tuple[str, ...] = field(default_factory=tuple)


def runs(artifacts: str | Path, task: str | None = None) -> list[RunUsers]:
    """Runs with personal adapters under `artifacts`, newest first, optionally of one task."""
    from oppu.adapters import find

    grouped: dict[str, RunUsers] = {}
    for entry in find(artifacts):
        if task is not None and entry.task != task:
            continue
        run = grouped.setdefault(entry.run_id, RunUsers(entry.run_id, entry.task))
        if entry.user_id not in run.users:
            grouped[entry.run_id] = RunUsers(run.run_id, run.task, (*run.users, entry.user_id))
    return list(grouped.values())


def _user_manifests(artifacts, run_id: str, user_id: str) -> dict[str, dict]:
    from oppu.adapters import find
    from oppu.manifest import read_manifest

    entry = next((e for e in find(artifacts, user_id) if e.run_id == run_id), None)
    if entry is None:
        raise PlaygroundError(f"user {user_id!r} has no adapters in run {run_id!r}: pick a user of that run")
    return {style: read_manifest(entry.folder / style) for style in entry.styles}


def compare(service, data_dir: str | Path, run_id: str, user_id: str, input_text: str, *,
            query_date: str | None = None, methods: Sequence[str] = PLAYGROUND_METHODS,
            max_new_tokens: int | None = None, task_data=None) -> list[Answer]:
    """Every method's answer to `input_text` (a task input, e.g. one of the user's queries) for this user of
    this run, all rows submitted together so they share batches. `task_data` (the run's task read from
    `data_dir`) saves a re-read when the caller holds it."""
    from oppu.adapters import run_config, task_adapter_for
    from oppu.config import METHODS
    from oppu.data import load_task_data
    from oppu.examples import build_prompt
    from oppu.experiment import method_style, visible_history
    from oppu.retrieval import get_retriever
    from oppu.serve.registry import ServedModel
    from oppu.tasks import get_task

    if not input_text.strip():
        raise PlaygroundError("the input is empty: type a task input or pick one of the user's queries")
    artifacts = service.cfg.artifacts
    manifests = _user_manifests(artifacts, run_id, user_id)
    first = next(iter(manifests.values()))
    cfg = run_config(first)
    task = get_task(cfg.task)
    data = task_data if task_data is not None else load_task_data(data_dir, task)
    user = data.user(user_id)
    history = visible_history(user, cfg.history_cutoff)
    retriever = get_retriever(cfg.retrieval.retriever,
                              partial(task.format_item, text_only=cfg.history_format == "text_only"))
    budget = max_new_tokens or service.default_budget(ServedModel("task", "task", cfg.task))
    answers: list[Answer] = []
    pending: list[tuple[int, object, str]] = []
    for method in methods:
        m = METHODS[method]
        style = method_style(cfg, method)
        if m.profile:
            answers.append(Answer(method, m.label, None, note="profile methods are not in the playground"))
            continue
        prompt, retrieved = build_prompt(task, input_text, style, history if style.retrieval else (), retriever,
                                         None, before=query_date)
        shown = tuple(Retrieved(str(item.id), task.format_item(item), float(score)) for item, score in retrieved)
        if m.adapter:
            if style.key not in manifests:
                answers.append(Answer(method, m.label, None, prompt, retrieved=shown,
                                      note=f"run {run_id} trained no `{style.key}` adapter (add {method} to its "
                                           "methods)"))
                continue
            model = service.registry.resolve(f"{run_id}/{user_id}@{style.key}")
        else:
            folder = task_adapter_for(artifacts, cfg, style, str(first.get("data_fingerprint", "")))
            model = (ServedModel(f"{cfg.task}@{style.key}", "task", cfg.task, run_id, None, style.key, None, folder)
                     if folder is not None else ServedModel("base", "base"))
        pending.append((len(answers), model, prompt))
        answers.append(Answer(method, m.label, model.id, prompt, retrieved=shown))
    if pending:
        outs = _answer_all(service, [(model, prompt) for _, model, prompt in pending], budget)
        for (i, _, _), text in zip(pending, outs, strict=True):
            a = answers[i]
            answers[i] = Answer(a.method, a.label, a.model_id, a.prompt, text, a.retrieved, a.profile, a.note)
    return answers


def _answer_all(service, jobs, budget: int) -> list[str]:
    """Each (served model, prompt) answered greedily, every row submitted before any is awaited."""
    import threading

    events, tokens, errors = [], [], []
    for model, prompt in jobs:
        done, got, err = threading.Event(), [], []

        def emit(event, done=done, got=got, err=err):
            if event[0] == "token":
                got.append(event[1])
                return
            if event[0] == "error":
                err.append(event[1])
            done.set()

        service.submit(model, service.chat_ids([{"role": "user", "content": prompt}]), budget, emit)
        events.append(done)
        tokens.append(got)
        errors.append(err)
    for done, err in zip(events, errors, strict=True):
        if not done.wait(600):
            raise TimeoutError("no answer within 600 s")
        if err:
            raise err[0]
    return [service.decode(t) for t in tokens]
