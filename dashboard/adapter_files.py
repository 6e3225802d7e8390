"""Personal adapter folders as the Adapters page sees them: list (from each `manifest.json`), zip, delete.

A user's adapter is a folder holding PEFT's files plus `manifest.json` (written by `oppu.model.save_user_adapter`).
Task-adaptation folders also carry a manifest but no `user_id`; they are not personal and are not listed.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS = ["user_id", "task", "run", "peft", "config", "items", "final_loss", "size", "created", "path"]


class AdapterFileError(ValueError):
    """An adapter folder is missing or lies outside the artifacts folder."""


def _first(manifest: Mapping[str, Any], *keys: str) -> Any:
    """The first of `keys` present in the manifest (tolerates the spellings different writers use)."""
    for key in keys:
        if manifest.get(key) is not None:
            return manifest[key]
    return None


def _peft_summary(manifest: Mapping[str, Any]) -> str:
    peft = _first(manifest, "peft", "user_peft", "peft_config") or {}
    if not isinstance(peft, Mapping):
        return str(peft)
    kind = peft.get("kind") or manifest.get("peft_kind") or ""
    parts = [str(kind)]
    if kind == "lora":
        parts.append(f"r={peft.get('r')} α={peft.get('alpha')}")
    if kind == "prompt":
        parts.append(f"{peft.get('num_virtual_tokens')} virtual tokens")
    elif peft.get("target_modules"):
        parts.append("on " + ",".join(peft["target_modules"]))
    return " ".join(p for p in parts if p)


def _final_loss(manifest: Mapping[str, Any]) -> float | None:
    loss = _first(manifest, "final_loss", "loss")
    if loss is None:
        losses = _first(manifest, "losses", "loss_history") or []
        loss = losses[-1] if losses else None
    if isinstance(loss, Mapping):
        loss = loss.get("loss")
    return None if loss is None else float(loss)


def _items(manifest: Mapping[str, Any]) -> int | None:
    value = _first(manifest, "n_items", "train_items", "items", "item_ids", "trained_on", "examples")
    if isinstance(value, (list, tuple)):
        return len(value)
    return None if value is None else int(value)


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def list_adapters(root: str | Path) -> pd.DataFrame:
    """One row per personal adapter under `root`, newest first (size in KiB)."""
    root = Path(root)
    rows = []
    for manifest_path in sorted(root.rglob("manifest.json")) if root.is_dir() else ():
        folder = manifest_path.parent
        if folder.name.startswith("."):  # a temp folder of an atomic write in progress
            continue
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(manifest, Mapping) or manifest.get("user_id") is None:
            continue
        rows.append({
            "user_id": str(manifest["user_id"]),
            "task": str(_first(manifest, "task") or folder.relative_to(root).parts[0]),
            "run": str(_first(manifest, "run_key", "run_id", "run") or folder.parent.name),
            "peft": _first(manifest, "peft_kind") or "",
            "config": _peft_summary(manifest),
            "items": _items(manifest),
            "final_loss": _final_loss(manifest),
            "size": folder_size(folder) / 1024,
            "created": _first(manifest, "created") or "",
            "path": str(folder),
        })
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values(["created", "user_id"], ascending=[False, True], ignore_index=True)


def _inside(folder: str | Path, root: str | Path) -> Path:
    """The resolved folder, refusing anything outside `root` (a crafted path must never delete elsewhere)."""
    folder, root = Path(folder).resolve(), Path(root).resolve()
    if not folder.is_relative_to(root) or folder == root:
        raise AdapterFileError(f"{folder} is not an adapter folder inside {root}")
    if not (folder / "manifest.json").is_file():
        raise AdapterFileError(f"{folder} has no manifest.json: not an OPPU adapter folder")
    return folder


def adapter_zip(folder: str | Path, root: str | Path) -> bytes:
    """The adapter folder as an in-memory zip whose entries sit under the folder's own name."""
    folder = _inside(folder, root)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, Path(folder.name) / path.relative_to(folder))
    return buffer.getvalue()


def delete_adapter(folder: str | Path, root: str | Path) -> None:
    shutil.rmtree(_inside(folder, root))
