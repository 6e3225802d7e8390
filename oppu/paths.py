"""Safe path building from hostile ids (user ids, task ids, run keys come from data files and the dashboard).

`safe_component` turns any string into one harmless path component; `within` refuses a path that escapes its root.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_HASH_TAIL = re.compile(r"-[0-9a-f]{8}$")
MAX_COMPONENT = 80
"""Longest kept part of an id; longer ids are cut and marked by their hash (file systems cap names at 255)."""


def safe_component(value: object) -> str:
    """A single path component for `value`: [A-Za-z0-9._-] kept, anything else replaced by `_`.

    When anything was changed (or cut), an 8-hex sha256 of the original is appended so that distinct ids never
    collide ("a/b" and "a_b" differ; an id that itself ends in "-<8 hex>" is hashed too). Never empty, never "." or "..", never starts with "." (hidden files).
    """
    text = str(value)
    cleaned = _UNSAFE.sub("_", text)[:MAX_COMPONENT]
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    # An id that already ends like an encoded one ("x-1a2b3c4d") is encoded too, so it cannot collide with one.
    if cleaned == text and cleaned and not _HASH_TAIL.search(text):
        return cleaned
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned}-{digest}" if cleaned else f"id-{digest}"


def within(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """`path` resolved, after checking that it stays inside `root` (symlinks followed); ValueError otherwise."""
    base = Path(root).resolve()
    target = (base / path).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"path {str(path)!r} escapes {str(base)!r}: refusing to read or write outside it")
    return target


def user_adapter_dir(root: str | os.PathLike[str], task: str, run_key: str, user_id: str) -> Path:
    """Folder of one user's personal adapter: root/<task>/<run key>/<user>, each part made safe."""
    return within(root, Path(safe_component(task)) / safe_component(run_key) / safe_component(user_id))


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder's content in a temporary sibling, then swap it in for `target` by renames.

    A reader (or a crash, or a full disk) never sees half a folder: until the block ends without an error the old
    `target` stays as it was, and on an error the temporary folder is removed. The old folder is deleted only once
    the new one is in place. Used for adapters, the model cache and data folders.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            old.rmdir()
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any, default: Any = None,
                      sort_keys: bool = False) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file.

    `default` is json.dump's fallback for values it cannot encode (e.g. `str` for job records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False, indent=1, default=default, sort_keys=sort_keys)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive `flock` on `path` (created with its folder) between processes, released on exit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
