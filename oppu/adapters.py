"""Personal adapters on disk: find them, export one user's as a zip, import one back, delete them.

This is the ownership story of OPPU: a user's adapters are standard PEFT folders that can leave with the user
and be deleted, and never hold another user's data. Layout (written by `oppu.experiment`):
`ARTIFACTS/adapters/<task>/<run id>/<user>/<style>/` holding PEFT's adapter files and `manifest.json`. An export
zip holds exactly one user's folder of one run; an import refuses any entry that is absolute, climbs out with
`..`, is a link, or lies outside one top folder. Used by `oppu adapters` and the dashboard's Adapters page.
"""

from __future__ import annotations

import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from oppu.manifest import MANIFEST_NAME, read_manifest


@dataclass(frozen=True)
class UserAdapters:
    user_id: str
    task: str
    run_id: str
    folder: Path
    """The user's folder of one run (its style sub-folders hold the adapters)."""
    styles: tuple[str, ...]
    created: str


def adapters_root(artifacts: str | Path) -> Path:
    return Path(artifacts) / "adapters"


def find(artifacts: str | Path, user_id: str | None = None) -> list[UserAdapters]:
    """Users' adapter folders under the artifacts folder, newest first (from each manifest)."""
    root = adapters_root(artifacts)
    grouped: dict[Path, dict] = {}
    for path in sorted(root.rglob(MANIFEST_NAME)) if root.is_dir() else ():
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # a temp folder of an atomic write
        manifest = read_manifest(path.parent)
        if manifest.get("user_id") is None or (user_id is not None and str(manifest["user_id"]) != user_id):
            continue
        entry = grouped.setdefault(path.parent.parent, {"manifest": manifest, "styles": []})
        entry["styles"].append(path.parent.name)
    found = [UserAdapters(str(e["manifest"]["user_id"]), str(e["manifest"].get("task", "")),
                          str(e["manifest"].get("run_id", folder.parent.name)), folder, tuple(sorted(e["styles"])),
                          str(e["manifest"].get("created", ""))) for folder, e in grouped.items()]
    return sorted(found, key=lambda a: (a.created, a.run_id), reverse=True)


def export_zip(entry: UserAdapters, out: str | Path) -> Path:
    """Zip exactly this user's folder (entries under the folder's own name)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(entry.folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, str(PurePosixPath(entry.folder.name, *path.relative_to(entry.folder).parts)))
    return out


def safe_members(archive: zipfile.ZipFile) -> str:
    """The single top folder of an export zip; ValueError on traversal, links or a foreign layout."""
    tops = set()
    for info in archive.infolist():
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts or "\\" in info.filename or ":" in info.filename:
            raise ValueError(f"refusing zip entry {info.filename!r}: it would write outside the adapters folder")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ValueError(f"refusing zip entry {info.filename!r}: links are not allowed in an adapter zip")
        tops.add(name.parts[0])
    if len(tops) != 1:
        raise ValueError(f"an adapter zip holds one user's folder; this one has {sorted(tops) or 'nothing'}")
    return tops.pop()


def import_zip(zip_path: str | Path, artifacts: str | Path) -> Path:
    """Unpack an exported zip to `adapters/<task>/<run>/<user>/` (from its manifest); returns that folder."""
    from oppu.model import adapter_complete
    from oppu.paths import user_adapter_dir

    with zipfile.ZipFile(zip_path) as archive:
        top = safe_members(archive)
        tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=_ensure(adapters_root(artifacts))))
        try:
            archive.extractall(tmp)
            folder = tmp / top
            styles = [d for d in folder.iterdir() if d.is_dir()]
            if not styles or not all(adapter_complete(d) for d in styles):
                raise ValueError(f"{zip_path}: not an exported adapter (each style folder needs the PEFT files and "
                                 "manifest.json)")
            manifest = read_manifest(styles[0])
            target = user_adapter_dir(adapters_root(artifacts), str(manifest.get("task", "imported")),
                                      str(manifest.get("run_id", "imported")), str(manifest["user_id"]))
            if target.exists():
                raise ValueError(f"{target} exists: delete it first (`oppu adapters delete "
                                 f"{manifest['user_id']} --run {manifest.get('run_id')}`)")
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def delete(entry: UserAdapters) -> Path:
    """Delete a user's folder of one run (every prompt style's adapter); returns the folder removed."""
    shutil.rmtree(entry.folder)
    return entry.folder

