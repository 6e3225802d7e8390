"""Personal adapters as the Adapters page shows them: a table from the manifests, a zip to export, deletion.

The layout and the export format are those of `oppu.adapters` (also behind `oppu adapters`), whose `find`
and `export_zip` this reuses: `ARTIFACTS/adapters/<task>/<run id>/<user>/<style>/` holds PEFT's files and
`manifest.json`; one export zip holds one user's folder of one run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from oppu.manifest import read_manifest

COLUMNS = ["user_id", "task", "run", "style", "methods", "peft", "items", "final_loss", "size_kib", "created",
           "folder"]


class AdapterFileError(ValueError):
    """An adapter folder is missing or lies outside the artifacts folder."""


def peft_summary(peft: Mapping[str, Any] | None) -> str:
    """"lora r=8 α=8 on q_proj,v_proj" from a manifest's `peft` (a PeftConfig as a dict)."""
    if not peft:
        return ""
    kind = peft.get("kind", "")
    if kind == "prompt":
        return f"prompt tuning, {peft.get('num_virtual_tokens')} virtual tokens"
    rank = f" r={peft.get('r')} α={peft.get('alpha')}" if kind == "lora" else ""
    return f"{kind}{rank} on {','.join(peft.get('target_modules') or [])}"


def folder_kib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1024


def list_adapters(artifacts: str | Path) -> pd.DataFrame:
    """One row per personal adapter (user × run × prompt style), newest first; `folder` is the user's folder of
    that run, the unit that export and delete act on."""
    from oppu.adapters import find

    rows = []
    for entry in find(artifacts):
        for style in entry.styles:
            try:
                manifest = read_manifest(entry.folder / style)
            except (OSError, ValueError):
                continue  # being rewritten by a resumed job; it shows on the next refresh
            rows.append({"user_id": entry.user_id, "task": entry.task, "run": entry.run_id, "style": style,
                         "methods": list(manifest.get("methods") or []),
                         "peft": peft_summary(manifest.get("peft")),
                         "items": manifest.get("item_count"), "final_loss": manifest.get("final_loss"),
                         "size_kib": folder_kib(entry.folder / style), "created": entry.created,
                         "folder": str(entry.folder)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _user_folder(folder: str | Path, artifacts: str | Path):
    """The `find` entry of a user's folder of one run; refuses any folder that is not one under `artifacts`."""
    from oppu.adapters import find

    wanted = Path(folder).resolve()
    for entry in find(artifacts):
        if entry.folder.resolve() == wanted:
            return entry
    raise AdapterFileError(f"{folder} is not a user's adapter folder under {Path(artifacts) / 'adapters'}")


def manifests(folder: str | Path, artifacts: str | Path) -> dict[str, dict]:
    """Each prompt style's manifest.json of a user's folder of one run."""
    entry = _user_folder(folder, artifacts)
    return {style: read_manifest(entry.folder / style) for style in entry.styles}


def adapter_zip(folder: str | Path, artifacts: str | Path) -> bytes:
    """The user's folder of one run as the zip `oppu adapters export` writes (importable with `oppu adapters
    import`)."""
    from oppu.adapters import export_zip

    entry = _user_folder(folder, artifacts)
    with tempfile.TemporaryDirectory() as tmp:
        return export_zip(entry, Path(tmp) / "adapter.zip").read_bytes()


def delete_adapter(folder: str | Path, artifacts: str | Path) -> None:
    """Delete a user's adapters of one run, as `oppu adapters delete USER --run RUN` does."""
    from oppu.adapters import delete

    delete(_user_folder(folder, artifacts))
