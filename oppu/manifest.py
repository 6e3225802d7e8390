"""The manifest beside every saved adapter: what it is, whose data it holds, how it was trained.

One file name, one writer and one reader for every adapter folder (a user's adapter from either training engine,
a cached task adapter), so the store, `oppu adapters` and the dashboard all read what the trainers wrote.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from oppu.errors import OppuError
from oppu.paths import write_json_atomic

MANIFEST_NAME = "manifest.json"


class ManifestError(OppuError, ValueError):
    """A manifest that is not a JSON object (a truncated or hand-edited file); the message names the file."""


def stamp_created(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with a `created` UTC time (kept when the caller gave one)."""
    return {**data, "created": data.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_manifest(folder: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write `data` as `folder/manifest.json` atomically (a temporary file renamed into place); keys sorted and
    values JSON cannot encode written as strings, so two runs with the same inputs write the same file."""
    path = Path(folder) / MANIFEST_NAME
    write_json_atomic(path, data, default=str, sort_keys=True)
    return path


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an adapter folder; FileNotFoundError when there is none, ManifestError when it does not
    parse as a JSON object."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the folder is not a complete OPPU adapter")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}): the adapter folder is damaged; delete it and "
                            "train again, or restore the file from an export") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path} holds a JSON {type(data).__name__}, not an object: the adapter folder is "
                            "damaged; delete it and train again")
    return data
