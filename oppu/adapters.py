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

from oppu.errors import OppuError
from oppu.manifest import MANIFEST_NAME, read_manifest

TASK_ADAPTERS = "task_adapters"
"""`ARTIFACTS/task_adapters/<task>/<key>/`: the cached task-adaptation LoRAs (`oppu.adaptation.adapt_task`)."""


class AdapterError(OppuError, ValueError):
    """An adapter folder or zip that cannot be used as asked; the message says what to do instead."""


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


def run_config(manifest: dict):
    """The `RunConfig` a personal adapter was trained under (from its manifest's portable config)."""
    from oppu.config import RunConfig

    config = manifest.get("config")
    if not isinstance(config, dict):
        raise AdapterError(f"the manifest of user {manifest.get('user_id')!r} holds no run config: the adapter was "
                           "not written by `oppu run`; train it again")
    return RunConfig.from_dict(config)


def prompt_style(manifest: dict):
    """The `PromptStyle` a personal adapter was trained and answers in (its first method's style)."""
    from oppu.config import METHODS
    from oppu.examples import PromptStyle
    from oppu.experiment import method_style

    cfg = run_config(manifest)
    for method in manifest.get("methods") or ():
        if method in METHODS:
            return method_style(cfg, method)
    key = str(manifest.get("style", "plain"))
    rag, pag = "rag" in key.split("+"), "pag" in key.split("+")
    return PromptStyle(retrieval=rag, profile=pag, k=cfg.retrieval.k if rag else 0,
                       text_only=cfg.history_format == "text_only")


def task_adapter_folder(artifacts: str | Path, manifest: dict) -> Path | None:
    """The task-adaptation LoRA a personal adapter was trained on top of (its prompt style's task-adapted base),
    or None when its run had no task adaptation or the cached LoRA is gone.

    Found by the cache key `oppu.adaptation.adapt_task` used (model, task, data, settings, style, retriever); a
    LoRA cached under an older key format is matched by its manifest's task, model, data and style instead.
    """
    from dataclasses import asdict

    from oppu.adaptation import adaptation_key
    from oppu.paths import safe_component

    cfg = run_config(manifest)
    if not cfg.task_adaptation:
        return None
    style = prompt_style(manifest)
    fingerprint = str(manifest.get("data_fingerprint", ""))
    model_name = cfg.model.name  # already `model_key` of the run's model (`experiment.portable_config`)
    key = adaptation_key(model=model_name, task=cfg.task, data=fingerprint, peft=asdict(cfg.adaptation_peft),
                         train=asdict(cfg.adaptation_train), style=asdict(style), retriever=cfg.retrieval.retriever)
    root = Path(artifacts) / TASK_ADAPTERS / safe_component(cfg.task)
    if (root / key / "adapter_model.safetensors").is_file():
        return root / key
    for path in sorted(root.glob(f"*/{MANIFEST_NAME}")) if root.is_dir() else ():
        try:
            meta = read_manifest(path.parent)
        except (OSError, ValueError):
            continue
        if (meta.get("task"), meta.get("model"), meta.get("data_fingerprint"), meta.get("style_key")) == \
                (cfg.task, model_name, fingerprint, style.key) and (path.parent / "adapter_model.safetensors").is_file():
            return path.parent
    return None


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

