"""What a served `model` name means: the base, a task-adapted base, or one user's personal adapter on disk.

Names (the OpenAI `model` field):
- `base`: the untuned base model;
- `<task>` (e.g. `LaMP_2M`): the task-adapted base of the newest run of that task that has one, in its plain
  prompt style; `<task>@<style>` for another style (`rag`, `pag`, `rag+pag`);
- `<run id>/<user id>`: that user's personal adapter of that run; `<task>/<user id>`: of the newest run of the task
  that has the user. `@<style>` picks the prompt style's adapter (default: `plain` when the run trained one, else
  the first).

A personal model is its user's adapter on top of the task-adapted base it was trained on, so it answers exactly as
the run's OPPU method did. Only adapters trained on this server's base model are served; the rest are refused with
a message naming the model they need. The registry reads the artifacts folder and re-reads it when a name is not
found, so an adapter written or imported after start is servable at once. No model or torch here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from oppu.errors import OppuError

BASE = "base"
STYLE_SEP = "@"


class UnknownModel(OppuError, KeyError):
    """No served model has this name; the message lists what to ask for."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class WrongBase(OppuError, ValueError):
    """The adapter was trained on another base model than the one this server holds."""


@dataclass(frozen=True)
class ServedModel:
    """One answerable model: which LoRA folders make it (none for the base)."""

    id: str
    """The canonical name (`base`, `<task>@<style>`, `<run>/<user>@<style>`)."""
    kind: str
    """`base`, `task` (task-adapted base) or `user` (a personal adapter over its task-adapted base)."""
    task: str | None = None
    run_id: str | None = None
    user_id: str | None = None
    style: str = "plain"
    adapter_folder: Path | None = None
    """The personal LoRA (kind `user`)."""
    task_folder: Path | None = None
    """The task-adaptation LoRA under it (None: the run had no task adaptation)."""
    created: str = ""

    @property
    def slot_key(self) -> str | None:
        """What the adapter cache holds this model under (None: no LoRA at all, the plain base)."""
        if self.kind == "base" or (self.adapter_folder is None and self.task_folder is None):
            return None
        return f"{self.adapter_folder or ''}|{self.task_folder or ''}"


def split_style(name: str) -> tuple[str, str | None]:
    head, sep, style = name.rpartition(STYLE_SEP)
    if sep and style and all(part in ("plain", "rag", "pag") for part in style.split("+")):
        return head, style
    return name, None


class Registry:
    """The served models found under an artifacts folder, for one base model (`model_key` of it)."""

    def __init__(self, artifacts: str | Path, model_key: str):
        self.artifacts = Path(artifacts)
        self.model_key = model_key
        self._lock = threading.Lock()
        self._users: list[ServedModel] = []
        self._foreign: dict[tuple[str, str], str] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read every adapter manifest (cheap: small JSON files)."""
        from oppu.adapters import find, prompt_style, run_config, task_adapter_folder
        from oppu.manifest import read_manifest

        users, foreign = [], {}
        for entry in find(self.artifacts):
            for style in entry.styles:
                folder = entry.folder / style
                try:
                    manifest = read_manifest(folder)
                    cfg = run_config(manifest)
                    style_key = prompt_style(manifest).key
                except (OSError, ValueError):
                    continue  # a damaged folder is not served; `oppu adapters list` shows it
                if cfg.model.name != self.model_key:
                    foreign[(entry.run_id, entry.user_id)] = cfg.model.name
                    continue
                users.append(ServedModel(f"{entry.run_id}/{entry.user_id}{STYLE_SEP}{style_key}", "user",
                                         entry.task, entry.run_id, entry.user_id, style_key, folder,
                                         task_adapter_folder(self.artifacts, manifest), entry.created))
        with self._lock:
            self._users, self._foreign = users, foreign

    # -- queries -------------------------------------------------------------------------------------------
    def models(self) -> list[ServedModel]:
        """Every served model: the base, each task's task-adapted bases, then every personal adapter."""
        with self._lock:
            users = list(self._users)
        tasks: dict[str, ServedModel] = {}
        for m in users:  # newest first: the first task folder seen per (task, style) is the newest run's
            if m.task_folder is not None:
                tasks.setdefault(f"{m.task}{STYLE_SEP}{m.style}",
                                 ServedModel(f"{m.task}{STYLE_SEP}{m.style}", "task", m.task, m.run_id, None,
                                             m.style, None, m.task_folder, m.created))
        return [ServedModel(BASE, "base"), *tasks.values(), *users]

    def resolve(self, name: str) -> ServedModel:
        """The model a request names; UnknownModel (after one re-read of the folder) when there is none."""
        for attempt in range(2):
            found = self._lookup(name)
            if found is not None:
                return found
            if attempt == 0:
                self.refresh()
        head, _, user = split_style(name)[0].partition("/")
        with self._lock:
            needed = self._foreign.get((head, user))
        if needed is not None:
            raise WrongBase(f"model {name!r} was trained on base model {needed!r}, but this server holds "
                            f"{self.model_key!r}: start `oppu serve --model` with that base")
        raise UnknownModel(f"the model {name!r} does not exist: use `base`, a task id (e.g. `LaMP_2M`), "
                           "`<run id>/<user id>` or `<task>/<user id>` (GET /v1/models lists them)")

    def _lookup(self, name: str) -> ServedModel | None:
        if name == BASE:
            return ServedModel(BASE, "base")
        bare, style = split_style(name)
        models = self.models()
        if "/" not in bare:
            tasks = [m for m in models if m.kind == "task" and m.task == bare]
            return _pick_style(tasks, style)
        head, _, user = bare.partition("/")
        mine = [m for m in models if m.kind == "user" and m.user_id == user and head in (m.run_id, m.task)]
        if not mine:
            return None
        newest = mine[0].run_id  # `find` lists newest first
        return _pick_style([m for m in mine if m.run_id == newest] if head != newest else mine, style)


def _pick_style(candidates: list[ServedModel], style: str | None) -> ServedModel | None:
    if style is not None:
        return next((m for m in candidates if m.style == style), None)
    return next((m for m in candidates if m.style == "plain"), candidates[0] if candidates else None)
