"""PAG profiles: a short text about a user, written by the LLM from that user's history.

A profile shipped with the data (`User.profile_text`, from OPPU's profile files) is used as is, unless the history
was narrowed (behaviour-shift cutoff): a profile written from the full history would leak later behaviour.
Generated profiles are cached per (user, model, task, history hash) in one small JSON file each under
`cache_dir/profiles/`, so reruns, other methods and other jobs reuse them; a changed history gets a new entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oppu.config import GenerationConfig

PROFILE_MAX_ITEMS = 16
"""Most recent history items shown to the summarising model (keeps the prompt within a small context)."""
PROFILE_MAX_NEW_TOKENS = 96


def history_hash(items: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.id, dict(item.fields), item.date], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def profile_items(items: Sequence[Any], max_items: int = PROFILE_MAX_ITEMS) -> list[Any]:
    """The most recent `max_items` items, in their original order."""
    from oppu.retrieval import get_retriever

    recent = {id(item) for item, _ in get_retriever("recency").retrieve("", items, max_items)}
    return [item for item in items if id(item) in recent]


def cache_path(cache_dir: str | os.PathLike, task_id: str, model_name: str, user_id: str, digest: str) -> Path:
    from oppu.paths import safe_component

    return (Path(cache_dir) / "profiles" / safe_component(task_id) / safe_component(model_name)
            / f"{safe_component(user_id)}-{digest}.json")


def build_profiles(users: Sequence[Any], task, model, tokenizer, cache_dir: str | os.PathLike, *,
                   model_name: str, histories: dict[str, Sequence[Any]] | None = None,
                   gen_cfg: GenerationConfig | None = None) -> dict[str, str]:
    """Profiles of several users (user id -> text); uncached ones are generated in one batched call.

    `model` is the base model or an `AdapterPool` (profiles always come from the base, never a user adapter).
    `histories` narrows a user's items (cutoff); a user absent from it uses the full history.
    """
    from oppu.data import write_json_atomic
    from oppu.generate import generate

    histories = histories or {}
    out: dict[str, str] = {}
    todo: list[tuple[str, Path, str]] = []  # (user id, cache file, prompt)
    for user in users:
        uid = str(user.id)
        items = list(histories.get(uid, user.history))
        if user.profile_text and len(items) == len(user.history):
            out[uid] = user.profile_text
            continue
        path = cache_path(cache_dir, task.id, model_name, uid, history_hash(items))
        if path.is_file():
            out[uid] = json.loads(path.read_text())["profile"]
            continue
        todo.append((uid, path, task.profile_prompt(profile_items(items))))
    if todo:
        cfg = gen_cfg or GenerationConfig()
        texts = generate(model, tokenizer, [prompt for _, _, prompt in todo], None, cfg,
                         max_new_tokens=PROFILE_MAX_NEW_TOKENS)
        for (uid, path, _), text in zip(todo, texts, strict=True):
            profile = text.strip()
            write_json_atomic(path, {"user_id": uid, "task": task.id, "model": model_name, "profile": profile,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            out[uid] = profile
    return out


def profile_for(user, task, model, tokenizer, cache_dir: str | os.PathLike, *, model_name: str = "model",
                items: Sequence[Any] | None = None, gen_cfg: GenerationConfig | None = None) -> str:
    """One user's profile (see `build_profiles`)."""
    histories = {str(user.id): items} if items is not None else None
    return build_profiles([user], task, model, tokenizer, cache_dir, model_name=model_name, histories=histories,
                          gen_cfg=gen_cfg)[str(user.id)]
