"""Ray backend: a job split into Ray shares gives the same predictions as one local run, and a Ray task that
dies is reported as a failed job instead of a hang. One local Ray session serves every test (startup is slow)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from oppu import jobs
from oppu.config import ModelConfig, RunConfig, TrainConfig
from oppu.jobs.folder import read_events
from oppu.store import Store

TESTS = str(Path(__file__).resolve().parent)


def crashing_runner(cfg, progress=None, should_stop=None, store=None, run_id=None, job_id=None):
    """A share whose process is killed (as by the OOM killer or `ray stop`) in the middle of its work."""
    progress("user:x:plain", 1, 2, 1.0)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    # Ray workers inherit the environment of the session: they import this module's runner through it
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = TESTS + os.pathsep + (old or "")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _cfg(tiny_model_dir, tiny_data_dir, tmp_path, db):
    return RunConfig(task="LaMP_2M", user_ids=("alice", "bob", "carol"), methods=("none", "oppu"),
                     data_dir=str(tiny_data_dir), db=str(tmp_path / db), artifacts_dir=str(tmp_path / "artifacts"),
                     model=ModelConfig(name=str(tiny_model_dir), device="cpu"), task_adaptation=False,
                     user_train=TrainConfig(epochs=2, batch_size=2, max_length=64))


def test_ray_shares_match_the_local_run(ray_session, tiny_model_dir, tiny_data_dir, tmp_path):
    from oppu.experiment import run_experiment

    local_cfg = _cfg(tiny_model_dir, tiny_data_dir, tmp_path, "local.duckdb")
    local_id = run_experiment(local_cfg, run_id="local-run")
    ray_cfg = _cfg(tiny_model_dir, tiny_data_dir, tmp_path, "ray.duckdb")
    root = tmp_path / "jobs"
    job_id = jobs.submit(ray_cfg, root, backend="ray", shares=2, start=False)
    assert jobs.run_worker(root, job_id) == 0, jobs.get_job(root, job_id).get("traceback")

    def answers(db, run_id):
        rows = []
        store = Store(db)
        for user in ray_cfg.user_ids:
            p = store.predictions_for(run_id, user)
            rows += [(user, q, m, o) for q, m, o in zip(p["query_id"], p["method"], p["output"])]
        return sorted(rows)

    local, remote = answers(local_cfg.db, local_id), answers(ray_cfg.db, job_id)
    assert len(remote) == len(local) > 0 and remote == local
    store = Store(ray_cfg.db)
    metrics = store.run_metrics(job_id)
    assert set(metrics["method"]) == {"none", "oppu"}
    assert store.runs().set_index("run_id").loc[job_id, "status"] == "done"
    job = jobs.get_job(root, job_id)
    assert job["state"] == "done" and job["users_total"] == 3 and job["progress"] == 1.0
    assert {e.get("share") for e in read_events(root / job_id) if "share" in e} == {0, 1}
    # the shares' readable lines are in the job's own log (not only in Ray's session logs), marked by share
    log = jobs.logs(root, job_id)
    for share in (0, 1):
        assert f"share {share}: " in log
        assert any(line.split(f"share {share}: ", 1)[-1].startswith(f"user:{u}") and "done in" in line
                   for u in ray_cfg.user_ids for line in log.splitlines() if f"share {share}: " in line), log


def test_killed_ray_task_fails_the_job(ray_session, tmp_path, tiny_data_dir):
    cfg = RunConfig(task="LaMP_2M", user_ids=("alice", "bob"), methods=("none",), db=str(tmp_path / "r.duckdb"),
                    data_dir=str(tiny_data_dir))
    root = tmp_path / "jobs"
    job_id = jobs.submit(cfg, root, backend="ray", shares=2, start=False, runner="test_ray_backend:crashing_runner")
    assert jobs.run_worker(root, job_id) == 1
    job = jobs.get_job(root, job_id)
    assert job["state"] == "failed" and "Ray share" in job["error"]
    assert Store(cfg.db).runs().iloc[0]["status"] == "failed"
