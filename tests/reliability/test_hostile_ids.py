"""Hostile identifiers: user ids, job ids, run ids and zip entries never become paths outside the project's folders.

One real run on the tiny model (the `hostile_run` fixture) trains adapters for users named like `../../etc/passwd`,
`/etc/cron.d/oppu`, `a<NUL>b`, `a/b`, `..`; then every file it created must sit under its artifacts or store
folder, every id must come back from the store unchanged, and the adapters must load with PEFT. Job ids come
through the CLI; adapter zips with traversal entries are built here and must be refused.
(`oppu.paths` itself is unit-tested in tests/test_paths.py, job-id checks of the API in tests/test_jobs.py.)
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import zipfile
from pathlib import Path

import pytest

from .conftest import HOSTILE_USERS, oppu, tree_hash


def test_run_writes_only_inside_its_folders(hostile_run):
    cfg = hostile_run.cfg
    allowed = (Path(cfg.artifacts_dir), Path(cfg.db).parent)
    created = [p for p in hostile_run.after - hostile_run.before if p.is_file()]
    assert created, "the run wrote nothing"
    outside = [str(p) for p in created if not any(p.is_relative_to(a) for a in allowed)]
    assert outside == []
    assert not any(p.name in ("passwd", "oppu", "cron.d") and "etc" in p.parts for p in created)


def test_hostile_user_ids_round_trip_through_the_store(hostile_run):
    from oppu.store import Store

    store = Store(hostile_run.cfg.db)
    assert store.done_users(hostile_run.run_id) == set(HOSTILE_USERS)
    for uid in HOSTILE_USERS:
        preds = store.predictions_for(hostile_run.run_id, uid)
        assert len(preds) == len(hostile_run.cfg.methods)


def test_hostile_user_adapters_are_distinct_folders_that_load_with_peft(hostile_run, tiny_model_dir):
    import peft
    from transformers import AutoModelForCausalLM

    from oppu.experiment import adapter_folder, method_style
    from oppu.manifest import read_manifest

    cfg = hostile_run.cfg
    style = method_style(cfg, "oppu")
    folders = {uid: adapter_folder(cfg, hostile_run.run_id, uid, style) for uid in HOSTILE_USERS}
    root = (Path(cfg.artifacts_dir) / "adapters").resolve()
    assert len(set(folders.values())) == len(HOSTILE_USERS)  # "a/b" and "a\0b" do not share a folder
    for uid, folder in folders.items():
        assert folder.resolve().is_relative_to(root)
        assert read_manifest(folder)["user_id"] == uid
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.PeftModel.from_pretrained(base, str(folders["../../etc/passwd"]))
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_profile_cache_paths_stay_inside(tmp_path):
    from oppu.profiles import cache_path

    for uid in HOSTILE_USERS:
        for model in ("../../m", "/abs/model"):
            path = cache_path(tmp_path, "LaMP_2M", model, uid, "0123abcd")
            assert path.resolve().is_relative_to((tmp_path / "profiles").resolve()), path


# -- adapter export / import ----------------------------------------------------------------------------------
def test_export_then_import_a_hostile_user(hostile_run, tmp_path):
    artifacts = hostile_run.cfg.artifacts_dir
    out = tmp_path / "export.zip"
    result = oppu("adapters", "--artifacts", artifacts, "export", "../../etc/passwd", "--out", out)
    assert result.rc == 0, result.stderr
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    assert names and all(not n.startswith("/") and ".." not in Path(n).parts for n in names)
    target = tmp_path / "other-artifacts"
    result = oppu("adapters", "--artifacts", target, "import", out)
    assert result.rc == 0, result.stderr
    imported = [p for p in target.rglob("manifest.json")]
    assert imported and all(p.resolve().is_relative_to((target / "adapters").resolve()) for p in imported)
    assert {json.loads(p.read_text())["user_id"] for p in imported} == {"../../etc/passwd"}


def _zip(entries: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, content)
    return buffer.getvalue()


_ADAPTER = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * 8}


def _exported(user_id: str = "u", task: str = "LaMP_2M", run_id: str = "r", top: str = "u") -> dict[str, bytes]:
    manifest = json.dumps({"user_id": user_id, "task": task, "run_id": run_id}).encode()
    return {f"{top}/plain/{name}": body for name, body in {**_ADAPTER, "manifest.json": manifest}.items()}


MALICIOUS_ZIPS = {
    "dotdot-entry": _zip({**_exported(), "u/../../../escaped.txt": b"x"}),
    "dotdot-top": _zip({"../escaped/plain/manifest.json": b"{}"}),
    "absolute-entry": _zip({**_exported(), "/tmp/oppu-escaped.txt": b"x"}),
    "backslash-entry": _zip({**_exported(), "u\\..\\..\\escaped.txt": b"x"}),
    "drive-entry": _zip({**_exported(), "C:/escaped.txt": b"x"}),
    "symlink-entry": _zip({**_exported(), "u/plain/link": b"/etc/passwd"}, links=("u/plain/link",)),
    "two-top-folders": _zip({**_exported(), "v/plain/manifest.json": b"{}"}),
    "empty-zip": _zip({}),
    "not-a-zip": b"PK\x03\x04 this is not really a zip",
    "no-manifest": _zip({"u/plain/adapter_config.json": b"{}"}),
}


@pytest.mark.parametrize("name", list(MALICIOUS_ZIPS))
def test_import_refuses_malicious_zips(name, tmp_path):
    artifacts = tmp_path / "artifacts"
    (artifacts / "adapters").mkdir(parents=True)
    (artifacts / "adapters" / "keep.txt").write_text("existing")
    zip_path = tmp_path / "evil" / "deep" / "x.zip"
    zip_path.parent.mkdir(parents=True)
    zip_path.write_bytes(MALICIOUS_ZIPS[name])
    before_all = {p for p in tmp_path.rglob("*")}
    before = tree_hash(artifacts)
    result = oppu("adapters", "--artifacts", artifacts, "import", zip_path)
    assert result.rc != 0
    assert len(result.one_line_error().strip().splitlines()) == 1
    assert tree_hash(artifacts) == before
    assert {p for p in tmp_path.rglob("*")} == before_all  # nothing written anywhere, temp folder removed
    assert not Path("/tmp/oppu-escaped.txt").exists()


@pytest.mark.parametrize("field", ["user_id", "task", "run_id"])
def test_import_with_hostile_manifest_ids_lands_inside(field, tmp_path):
    ids = {"user_id": "u", "task": "LaMP_2M", "run_id": "r", field: "../../../../outside"}
    zip_path = tmp_path / "x.zip"
    zip_path.write_bytes(_zip(_exported(**ids)))
    artifacts = tmp_path / "a" / "b" / "artifacts"
    result = oppu("adapters", "--artifacts", artifacts, "import", zip_path)
    assert result.rc == 0, result.stderr
    manifests = list(tmp_path.rglob("manifest.json"))
    assert len(manifests) == 1 and manifests[0].resolve().is_relative_to((artifacts / "adapters").resolve())


def test_cli_delete_of_hostile_user_touches_nothing_else(hostile_run, tmp_path):
    outside = tmp_path / "victim.txt"
    outside.write_text("keep")
    artifacts = hostile_run.cfg.artifacts_dir
    before = tree_hash(artifacts)
    for uid in ("..", "../..", str(tmp_path), "*"):
        result = oppu("adapters", "--artifacts", artifacts, "delete", uid, "--run", "no-such-run")
        assert result.rc != 0 and "no adapters" in result.one_line_error()
    assert tree_hash(artifacts) == before and outside.read_text() == "keep"


# -- job ids through the CLI, dashboard deletes with crafted paths ----------------------------------------------
HOSTILE_JOB_IDS = ["../../etc/passwd", "/etc", "..", "a/b", "20250101-000000-abcdef/../..", "-rf", " "]


@pytest.mark.parametrize("action", ["show", "cancel", "resume", "logs"])
def test_cli_jobs_refuse_hostile_job_ids(action, tmp_path):
    root = tmp_path / "jobs"
    for job_id in HOSTILE_JOB_IDS:
        result = oppu("jobs", action, "--root", root, "--", job_id) if job_id.startswith("-") else \
            oppu("jobs", action, "--root", root, job_id)
        assert result.rc != 0, (job_id, result.stdout)
        result.one_line_error()
    assert not root.exists() or [p.name for p in root.iterdir()] in ([], [".lock"])


def test_worker_refuses_hostile_job_id(tmp_path):
    result = oppu("worker", "../../etc", "--root", tmp_path / "jobs")
    assert result.rc != 0 and "invalid job id" in result.stdout + result.stderr


def test_dashboard_refuses_to_delete_or_zip_outside_artifacts(tmp_path):
    from dashboard.adapter_files import AdapterFileError, adapter_zip, delete_adapter

    root = tmp_path / "artifacts"
    root.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "manifest.json").write_text('{"user_id": "x"}')
    (root / "link").symlink_to(victim)
    for crafted in (victim, root / ".." / "victim", root / "link", root, Path("/etc")):
        for action in (delete_adapter, adapter_zip):
            with pytest.raises(AdapterFileError):
                action(crafted, root)
    assert (victim / "manifest.json").is_file()


def test_etc_passwd_is_untouched():
    """A cheap tripwire: whatever the tests above did, the real /etc/passwd is what it was at import time."""
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == _PASSWD


_PASSWD = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
