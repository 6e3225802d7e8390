"""Crashes: kill -9 of the worker at three points of a real job, and a full disk during writes.

Kill points (the real `run_experiment` on the tiny model, started through `oppu.jobs`): during task adaptation,
during a user's training, and during generation (after every adapter of the chunk is trained, before any
prediction is written). After `resume` the predictions must equal those of an uninterrupted run exactly, with no
duplicate or missing row, and every adapter must load with PEFT.

Full disk: a 4 MiB tmpfs when this process may mount one (root), else a child process with RLIMIT_FSIZE. A write
that cannot complete must fail with a clear error and leave the previous file or rows intact (atomic writes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from oppu import jobs
from oppu.config import GenerationConfig, ModelConfig, RunConfig, TrainConfig
from oppu.jobs.folder import read_events
from oppu.store import Store

from .conftest import ROOT, tree_hash

USERS = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def crash_cfg(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> RunConfig:
    # batch 1 and a 24-token budget make each stage last a second or more, so a 20 ms poll lands inside it
    return RunConfig(task="LaMP_2M", user_ids=USERS, methods=("none", "oppu"), data_dir=str(tiny_data_dir),
                     db=str(tmp_path_factory.mktemp("ref") / "r.duckdb"),
                     artifacts_dir=str(tmp_path_factory.mktemp("ref-art")),
                     model=ModelConfig(name=str(tiny_model_dir), device="cpu"), task_adaptation=True,
                     adaptation_train=TrainConfig(epochs=2, lr=1e-2, batch_size=1, max_length=80, max_examples=10),
                     user_train=TrainConfig(epochs=2, lr=1e-2, batch_size=1, max_length=80),
                     generation=GenerationConfig(max_new_tokens=24, batch_size=1))


def _answers(db: str, run_id: str) -> dict:
    frame = Store(db).user_metrics(run_id)  # touch user metrics too: they mark users done
    assert not frame.empty
    out = {}
    for user in USERS:
        preds = Store(db).predictions_for(run_id, user)
        keys = list(zip(preds["query_id"], preds["method"]))
        assert len(keys) == len(set(keys)), f"duplicate rows for {user}"
        out.update({(user, q, m): (o, r) for q, m, o, r in
                    zip(preds["query_id"], preds["method"], preds["output"], preds["raw_output"])})
    return out


@pytest.fixture(scope="module")
def reference(crash_cfg) -> dict:
    """Predictions of the uninterrupted run."""
    from oppu.experiment import run_experiment

    return _answers(crash_cfg.db, run_experiment(crash_cfg))


def _attempt_events(root: Path, job_id: str) -> list[dict]:
    """Progress events of the current attempt only (after the last `started` / `resumed`)."""
    events = read_events(jobs.job_dir(root, job_id))
    start = max((i for i, e in enumerate(events) if e.get("stage") in ("started", "resumed")), default=-1)
    return events[start + 1:]


def _in_adaptation(events: list[dict]) -> bool:
    return any(e.get("stage") == "task_adaptation" for e in events)


def _in_training(events: list[dict]) -> bool:
    return any(e.get("stage") == "train_user" and e.get("user") == "bob" for e in events)


def _in_generation(events: list[dict]) -> bool:
    last = [e for e in events if e.get("stage") == "train_user" and e.get("user") == "carol"]
    return bool(last) and last[-1].get("step") == last[-1].get("steps_total")


KILL_POINTS = {"task-adaptation": _in_adaptation, "user-training": _in_training, "generation": _in_generation}


def test_kill_9_at_every_stage_then_resume_equals_an_uninterrupted_run(crash_cfg, reference, tmp_path,
                                                                      record_property):
    """One job killed three times — in task adaptation, in bob's training, in generation — and resumed after
    each kill; the final predictions are those of the uninterrupted run, row for row."""
    import peft
    from transformers import AutoModelForCausalLM

    from oppu.experiment import adapter_folder, adapter_styles

    cfg = crash_cfg.replace(db=str(tmp_path / "r.duckdb"), artifacts_dir=str(tmp_path / "art"))
    root = tmp_path / "jobs"
    store = Store(cfg.db)
    job_id = jobs.submit(cfg, root)
    for point, reached in KILL_POINTS.items():
        if point != "task-adaptation":
            jobs.resume(root, job_id)
        pid = jobs.get_job(root, job_id)["pid"]
        deadline = time.monotonic() + 180
        while not reached(_attempt_events(root, job_id)):
            assert time.monotonic() < deadline and jobs.get_job(root, job_id)["state"] == "running", \
                (point, jobs.logs(root, job_id))
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        # the kill landed where it was meant to: nothing of the stage's result was stored yet
        assert store.prediction_count(job_id) == 0, point
        if point == "task-adaptation":
            assert not list((Path(cfg.artifacts_dir) / "task_adapters").rglob("adapter_model.safetensors"))
        _wait_state(root, job_id, {"interrupted"}, 10)
    record_property("crash_points", len(KILL_POINTS))
    jobs.resume(root, job_id)
    _wait_state(root, job_id, {"done", "failed"}, 240)
    job = jobs.get_job(root, job_id)
    assert job["state"] == "done" and job["attempts"] == len(KILL_POINTS) + 1, jobs.logs(root, job_id)
    assert _answers(cfg.db, job_id) == reference
    assert store.prediction_count(job_id) == len(reference)  # no duplicate, no missing row
    assert store.done_users(job_id) == set(USERS)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name)
    for user in USERS:
        for style in adapter_styles(cfg):
            model = peft.PeftModel.from_pretrained(base, str(adapter_folder(cfg, job_id, user, style)))
            assert any("lora_A" in name for name, _ in model.named_parameters())
            base = model.unload()
    leftovers = [p for p in Path(cfg.artifacts_dir).rglob(".*")]
    assert leftovers == [], leftovers  # killed atomic writes left no temp folder behind after the resume


def _stage_steps(events: list[dict], stage: str, user: str | None = None) -> list[int]:
    return [int(e.get("step") or 0) for e in events
            if e.get("stage") == stage and (user is None or e.get("user") == user)]


def _checkpointed_step(folder: Path) -> int:
    import torch

    (path,) = list(folder.rglob("state.pt"))
    return int(torch.load(path, weights_only=True)["step"])


def test_kill_9_mid_stage_then_resume_continues_from_the_checkpoint(crash_cfg, reference, tmp_path, monkeypatch):
    """kill -9 in the middle of task adaptation, resume, kill -9 in the middle of the users' training, resume:
    each resumed attempt continues the killed stage at its last checkpoint, never at step 0; the job's history
    keeps every state it passed through and its elapsed time adds up; the final predictions are the
    uninterrupted run's."""
    monkeypatch.setenv("OPPU_CHECKPOINT_EVERY", "1")  # the workers inherit it
    cfg = crash_cfg.replace(db=str(tmp_path / "r.duckdb"), artifacts_dir=str(tmp_path / "art"))
    root = tmp_path / "jobs"
    job_id = jobs.submit(cfg, root)
    points = [("task_adaptation", None, Path(cfg.artifacts_dir) / "task_adapters"),
              ("train_user", "bob", Path(cfg.artifacts_dir) / "checkpoints")]
    saved, elapsed = [], 0.0
    for i, (stage, user, folder) in enumerate(points):
        if i:
            jobs.resume(root, job_id)
        pid = jobs.get_job(root, job_id)["pid"]
        deadline = time.monotonic() + 180
        while not (max(_stage_steps(_attempt_events(root, job_id), stage, user), default=0) >= 3
                   and list(folder.rglob("state.pt"))):
            assert time.monotonic() < deadline and jobs.get_job(root, job_id)["state"] == "running", \
                (stage, jobs.logs(root, job_id))
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        _wait_state(root, job_id, {"interrupted"}, 10)
        saved.append(_checkpointed_step(folder))
        assert saved[-1] >= 1, stage
        job = jobs.get_job(root, job_id)
        assert job["elapsed_s"] > elapsed  # attempts add up: a resume does not reset the clock
        elapsed = job["elapsed_s"]
        if i:  # the attempt that was just killed continued task adaptation from its checkpoint
            steps = _stage_steps(_attempt_events(root, job_id), "task_adaptation")
            _assert_continues(steps, saved[0])
    jobs.resume(root, job_id)
    _wait_state(root, job_id, {"done", "failed"}, 240)
    job = jobs.get_job(root, job_id)
    assert job["state"] == "done", jobs.logs(root, job_id)
    _assert_continues(_stage_steps(_attempt_events(root, job_id), "train_user", "bob"), saved[1])
    assert _answers(cfg.db, job_id) == reference
    assert [h["state"] for h in job["history"]] == ["queued", "running", "interrupted", "resumed", "running",
                                                     "interrupted", "resumed", "running", "done"]
    assert job["elapsed_s"] > elapsed
    assert not list(Path(cfg.artifacts_dir).rglob("state.pt"))  # every checkpoint removed once its stage saved


def _assert_continues(steps: list[int], saved: int) -> None:
    """A stage's steps in one attempt: an optional step-0 announcement, then the checkpoint's step, then on."""
    moving = [s for s in steps if s > 0]
    assert moving and moving[0] == saved and moving == sorted(moving), (saved, steps)


def _wait_state(root, job_id, states, timeout):
    deadline = time.monotonic() + timeout
    while jobs.get_job(root, job_id)["state"] not in states:
        assert time.monotonic() < deadline, jobs.get_job(root, job_id)
        time.sleep(0.2)


# -- a full disk -------------------------------------------------------------------------------------------------
@pytest.fixture()
def small_disk(tmp_path):
    """(folder, how): a 4 MiB tmpfs when mounting works, else a plain folder and RLIMIT_FSIZE in the child."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = os.geteuid() == 0 and not os.environ.get("OPPU_TEST_NO_TMPFS") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True, check=False).returncode == 0
    yield folder, "tmpfs" if mounted else "rlimit"
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _child(script: str, how: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `script` in a child; with `rlimit`, files beyond 256 KiB cannot be written (EFBIG, like a full disk)."""
    prelude = textwrap.dedent("""
        import resource, signal, sys
        if sys.argv[1] == "rlimit":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script), how], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _fill(folder: Path, how: str) -> None:
    """Leave about 100 KiB free on the tmpfs (the rlimit child needs no filling)."""
    if how == "tmpfs":
        stats = os.statvfs(folder)
        with open(folder / "ballast", "wb") as fh:
            fh.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - 100 * 1024))


def test_disk_full_during_a_json_write_keeps_the_previous_file(small_disk):
    folder, how = small_disk
    target = folder / "LaMP_2M" / "user_top_100_history.json"
    target.parent.mkdir()
    target.write_text('[{"user_id": "old"}]')
    _fill(folder, how)
    result = _child(f"""
        from oppu.data import write_json_atomic
        write_json_atomic({str(target)!r}, [{{"user_id": "new", "blob": "x" * 2_000_000}}])
    """, how, folder)
    assert result.returncode != 0 and ("No space left" in result.stderr or "too large" in result.stderr)
    assert target.read_text() == '[{"user_id": "old"}]'
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no half-written temp file left


def test_disk_full_during_data_convert_is_one_line_and_keeps_previous_data(small_disk, tmp_path):
    import json

    folder, how = small_disk
    questions = tmp_path / "q.json"
    profile = [{"id": f"p{i}", "description": "space " * 60, "tag": "comedy"} for i in range(400)]
    questions.write_text(json.dumps([{"id": "1", "input": "description: a film", "profile": profile}]))
    out = folder / "data"
    (out / "LaMP_2M").mkdir(parents=True)
    (out / "LaMP_2M" / "user_top_100_history.json").write_text("[]")
    before = tree_hash(out)
    _fill(folder, how)
    result = _child(f"""
        import sys
        from oppu.__main__ import main
        sys.exit(main(["data", "convert", "--task", "LaMP_2M", "--questions", {str(questions)!r},
                       "--out", {str(out)!r}]))
    """, how, ROOT)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "oppu data convert: error" in result.stderr
    assert tree_hash(out) == before
    assert sorted(p.name for p in (out / "LaMP_2M").iterdir()) == ["user_top_100_history.json"]


def test_disk_full_during_a_store_write_keeps_every_stored_row(small_disk):
    folder, how = small_disk
    db = folder / "r.duckdb"
    store = Store(db)
    store.create_run("r1", {"methods": ["none"]}, task="LaMP_2M", model="m", data_fingerprint="f",
                     code_version="c")
    row = {"run_id": "r1", "task": "LaMP_2M", "user_id": "u", "method": "none", "k": 0, "peft": "",
           "retriever": "", "raw_output": "comedy", "output": "comedy", "gold": "comedy", "retrieved_ids": [],
           "retrieved_scores": [], "history_size": 1, "correct": 1.0}
    store.add_predictions([{**row, "query_id": f"q{i}", "prompt": "p"} for i in range(10)])
    _fill(folder, how)
    result = _child(f"""
        from oppu.store import Store
        row = {row!r}
        Store({str(db)!r}).add_predictions([{{**row, "query_id": f"big{{i}}", "prompt": "x" * 5000}}
                                            for i in range(2000)])
    """, how, folder)
    assert result.returncode != 0
    assert "Error" in result.stderr
    (folder / "ballast").unlink(missing_ok=True)
    assert Store(db).prediction_count("r1") == 10  # the failed batch is rolled back, the old rows are intact
