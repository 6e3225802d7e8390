"""Jobs: real worker processes running a fast fake runner (lifecycle, cancel, kill -9 + resume, slots), the pure
progress summary, hostile ids, and one end-to-end job with the real `run_experiment` on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from oppu import jobs
from oppu.config import RunConfig
from oppu.jobs.lifecycle import dead_reason
from oppu.store import Store

TESTS = str(Path(__file__).resolve().parent)
FAKE = "test_jobs:fake_runner"


def fake_runner(cfg, progress=None, should_stop=None, store=None, run_id=None, job_id=None):
    """Stands in for run_experiment: per user, `steps` sleeps with progress, then predictions and user metrics.
    Settings come from cfg.tag, e.g. "steps=3 sleep=0.05 ignore_stop=1 fail=1"."""
    opts = {k: float(v) for k, v in (kv.split("=") for kv in cfg.tag.split())}
    store = store or Store(cfg.db)
    store.create_run(run_id, cfg.to_dict(), cfg.task, "fake", "fp", "test", cfg.tag, job_id)
    done = store.done_users(run_id)
    users = list(cfg.user_ids)
    for i, user in enumerate(users):
        if user in done:
            continue
        steps = int(opts.get("steps", 3))
        for step in range(1, steps + 1):
            if should_stop and should_stop() and not opts.get("ignore_stop"):
                store.set_status(run_id, "cancelled")
                return run_id
            time.sleep(opts.get("sleep", 0.05))
            progress(f"user:{user}:plain", step, steps, 2.0 / step)
        if opts.get("fail"):
            raise RuntimeError(f"fake failure on user {user}")
        rows = [{"run_id": run_id, "task": cfg.task, "user_id": user, "query_id": f"{user}-q{q}", "method": m,
                 "k": 1, "peft": "lora", "retriever": "bm25", "prompt": "p", "raw_output": "comedy",
                 "output": "comedy", "gold": "comedy", "retrieved_ids": [], "retrieved_scores": [],
                 "history_size": 5 + i, "correct": 1.0} for q in range(2) for m in cfg.methods]
        store.add_predictions(rows)
        for m in cfg.methods:
            store.add_user_metrics(run_id, user, m, {"accuracy": 1.0}, history_size=5 + i)
        progress("users", i + 1, len(users), None)
    store.finish_run(run_id, {m: {"accuracy": 1.0} for m in cfg.methods})
    return run_id


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_data_dir):
    """Worker processes import this module (the fake runner) through PYTHONPATH; submit reads the tiny data."""
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OPPU_TEST_DATA", str(tiny_data_dir))
    return tmp_path


def _cfg(tmp_path, tag, users=("alice", "bob", "carol"), methods=("none", "oppu")):
    return RunConfig(task="LaMP_2M", user_ids=users, methods=methods, db=str(tmp_path / "r.duckdb"), tag=tag,
                     data_dir=os.environ["OPPU_TEST_DATA"])


def _wait(predicate, timeout=30.0, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


def _state(root, job_id):
    return jobs.get_job(root, job_id)["state"]


# -- pure parts --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../etc", "", "a/b", "20250101-000000-abcdeg", "20250101-000000-abcdef/..",
                                 "/tmp/x", "20250101-000000-ABCDEF", "..", "20250101-000000-abcdef\n"])
def test_hostile_job_ids_are_refused_everywhere(tmp_path, bad):
    with pytest.raises(jobs.JobError, match="invalid job id"):
        jobs.check_job_id(bad)
    for call in (jobs.get_job, jobs.cancel, jobs.resume, jobs.logs, jobs.run_worker):
        with pytest.raises(jobs.JobError, match="invalid job id"):
            call(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_new_job_ids_are_valid_and_distinct():
    ids = {jobs.new_job_id() for _ in range(50)}
    assert len(ids) == 50 and all(jobs.check_job_id(i) for i in ids)


def test_progress_events_from_run_experiment_reports():
    # task adaptation is no user: it carries its prompt style, never a made-up user id
    assert jobs.progress_event("adapt:LaMP_2M:rag1", 2, 10, 1.5) == {
        "stage": "task_adaptation", "key": "adapt:LaMP_2M:rag1", "style": "rag1", "step": 2, "steps_total": 10,
        "loss": 1.5}
    assert jobs.progress_event("user:u:1:rag1", 1, 4, 0.5)["user"] == "u:1"  # ids may contain ':'
    assert jobs.progress_event("users", 3, 5, None) == {"stage": "users", "users_done": 3, "users_total": 5}
    assert jobs.progress_event({"stage": "generate", "user": "x"}) == {"stage": "generate", "user": "x"}
    with pytest.raises(jobs.JobError, match="expected a dict"):
        jobs.progress_event("a", 1)


def test_summarize_progress_counts_users_and_extrapolates():
    events = [{"t": 0, "stage": "started", "users_total": 4, "users_done_before": 1},
              {"t": 10, "stage": "train_user", "user": "b", "step": 1, "steps_total": 2, "loss": 3.0},
              {"t": 20, "stage": "train_user", "user": "b", "step": 2, "steps_total": 2, "loss": 1.0},
              {"t": 30, "stage": "train_user", "user": "c", "step": 1, "steps_total": 2, "loss": 2.0}]
    s = jobs.summarize_progress(events, now=40)
    # user a was done before this attempt, b is trained, c half way: 2.5 of 4; only a is done (results are
    # stored when a chunk ends, so b counts as done once the runner reports it)
    assert s["progress"] == pytest.approx(2.5 / 4) and s["user_index"] == 3 and s["users_done"] == 1
    assert s["eta_s"] == pytest.approx(30 * 1.5 / 1.5)  # 1.5 users in 30 s since the first training step
    assert s["loss"] == 2.0 and s["loss_history"] == [3.0, 1.0, 2.0] and s["user"] == "c"
    assert s["losses"][0] == {"step": 1, "loss": 3.0, "user_id": "b", "style": "", "stage": "train_user"}
    finished = jobs.summarize_progress(events + [{"t": 50, "stage": "users", "users_done": 4, "users_total": 4},
                                                 {"t": 51, "stage": "done"}], now=60)
    assert finished["progress"] == 1.0 and finished["eta_s"] is None


def test_summarize_progress_adds_up_ray_shares_and_ignores_older_attempts():
    events = [{"stage": "started", "users_total": 9}, {"stage": "train_user", "user": "old", "step": 1},
              {"stage": "resumed", "users_total": 4, "users_done_before": 0},
              {"stage": "ray", "shares": 2, "users_total": 4},
              {"stage": "users", "users_done": 2, "users_total": 2, "share": 0},
              {"stage": "train_user", "user": "d", "step": 1, "steps_total": 4, "share": 1}]
    s = jobs.summarize_progress(events, now=1)
    assert s["users_total"] == 4 and s["progress"] == pytest.approx(2 / 4)
    assert all(p["user_id"] != "old" for p in s["losses"])


def test_split_users_is_contiguous_and_complete():
    users = [str(i) for i in range(7)]
    parts = jobs.split_users(users, 3)
    assert parts == [["0", "1", "2"], ["3", "4"], ["5", "6"]]
    assert jobs.split_users(users[:2], 5) == [["0"], ["1"]]


def test_submit_validates_its_options(env):
    tmp_path = env
    cfg = _cfg(tmp_path, "steps=1")
    with pytest.raises(jobs.JobError, match="backend"):
        jobs.submit(cfg, tmp_path / "jobs", backend="slurm")
    with pytest.raises(jobs.JobError, match="module.path:function"):
        jobs.submit(cfg, tmp_path / "jobs", runner="os.system('x')")


# -- in-process worker -------------------------------------------------------------------------------------------
def test_submit_refuses_unknown_users_and_missing_data_before_writing(env):
    from oppu.data import DataError, UnknownUserError

    root = env / "jobs"
    with pytest.raises(UnknownUserError, match="nosuchuser"):
        jobs.submit(_cfg(env, "steps=1", users=("alice", "nosuchuser")), root)
    with pytest.raises(DataError):
        jobs.submit(_cfg(env, "steps=1").replace(data_dir=str(env / "missing")), root)
    assert not root.exists() or list(root.iterdir()) == []
    job_id = jobs.submit(_cfg(env, "steps=1", users=("carol", "alice")), root, start=False)
    assert jobs.get_job(root, job_id)["users"] == ["carol", "alice"]


def test_failed_runner_records_error_and_traceback(env):
    tmp_path = env
    root = tmp_path / "jobs"
    job_id = jobs.submit(_cfg(tmp_path, "steps=1 sleep=0 fail=1"), root, start=False)
    assert jobs.run_worker(root, job_id, runner=fake_runner) == 1
    job = jobs.get_job(root, job_id)
    assert job["state"] == "failed" and "fake failure on user alice" in job["error"]
    assert "RuntimeError" in job["traceback"]
    assert Store(tmp_path / "r.duckdb").runs().iloc[0]["status"] == "failed"
    assert jobs.run_worker(root, job_id, runner=fake_runner) == 2  # a failed job needs a retry first


def test_job_users_and_code_version_are_the_runs_own(env):
    from oppu.data import load_task_data
    from oppu.experiment import code_version, select_users

    root = env / "jobs"
    most_active = _cfg(env, "steps=1", users=None).replace(users=2)
    expected = [u.id for u in select_users(load_task_data(most_active.data_dir, most_active.task), most_active)]
    queued = jobs.submit(most_active, root, start=False)
    assert jobs.get_job(root, queued)["users"] == expected
    # cancelled while queued: otherwise the worker run below starts it (the real pipeline) when it frees a slot
    assert jobs.cancel(root, queued) == "cancelled"
    job_id = jobs.submit(_cfg(env, "steps=1 sleep=0", users=("bob",)), root, start=False)
    assert jobs.run_worker(root, job_id, runner=fake_runner) == 0
    assert Store(env / "r.duckdb").runs().iloc[0]["code_version"] == code_version()


# -- worker processes --------------------------------------------------------------------------------------------
def test_submit_shows_progress_then_done(env):
    root = env / "jobs"
    job_id = jobs.submit(_cfg(env, "steps=4 sleep=0.15"), root, runner=FAKE)
    assert jobs.get_job(root, job_id)["state"] == "running"  # submit returned at once; the worker runs
    seen = _wait(lambda: (j := jobs.get_job(root, job_id))["stage"] == "train_user" and j)
    assert seen["users_total"] == 3 and seen["loss"] is not None and seen["elapsed_s"] >= 0
    _wait(lambda: _state(root, job_id) == "done")
    job = jobs.get_job(root, job_id)
    # done: every user finished, none is being worked on any more
    assert job["progress"] == 1.0 and job["users_done"] == 3 and job["user_index"] is None and job["error"] is None
    store = Store(env / "r.duckdb")
    assert store.prediction_count(job_id) == 3 * 2 * 2
    run = store.runs().set_index("run_id").loc[job_id]
    assert run["status"] == "done" and run["job_id"] == job_id
    assert f"job {job_id}: done" in jobs.logs(root, job_id)


def test_cancel_stops_worker_and_keeps_finished_users(env):
    root = env / "jobs"
    job_id = jobs.submit(_cfg(env, "steps=40 sleep=0.1", users=("alice", "bob")), root, runner=FAKE)
    _wait(lambda: (jobs.get_job(root, job_id)["step"] or 0) >= 2)
    t0 = time.monotonic()
    assert jobs.cancel(root, job_id) == "running"  # flagged; the worker stops at its next check
    _wait(lambda: _state(root, job_id) == "cancelled", timeout=10)
    assert time.monotonic() - t0 < 5
    assert Store(env / "r.duckdb").runs().iloc[0]["status"] == "cancelled"
    assert jobs.cancel(root, job_id) == "cancelled"  # idempotent


def test_cancel_interrupts_a_runner_that_ignores_the_flag(env):
    root = env / "jobs"
    job_id = jobs.submit(_cfg(env, "steps=400 sleep=0.1 ignore_stop=1", users=("alice",)), root, runner=FAKE)
    _wait(lambda: jobs.get_job(root, job_id)["stage"] == "train_user")
    jobs.cancel(root, job_id)
    _wait(lambda: _state(root, job_id) == "cancelled", timeout=jobs.CANCEL_GRACE_S + 6)


def test_kill_9_is_interrupted_and_resume_completes_without_duplicates(env):
    root = env / "jobs"
    users = ("alice", "bob", "carol")
    job_id = jobs.submit(_cfg(env, "steps=6 sleep=0.1", users=users), root, runner=FAKE)
    store = Store(env / "r.duckdb")
    _wait(lambda: store.done_users(job_id) >= {"alice"})
    first = store.predictions_for(job_id, "alice")["query_id"].tolist()
    os.kill(jobs.get_job(root, job_id)["pid"], signal.SIGKILL)
    _wait(lambda: _state(root, job_id) == "interrupted", timeout=5)
    assert "worker process" in jobs.get_job(root, job_id)["error"]
    jobs.resume(root, job_id)
    _wait(lambda: _state(root, job_id) == "done")
    assert store.prediction_count(job_id) == len(users) * 2 * 2
    assert store.predictions_for(job_id, "alice")["query_id"].tolist() == first
    job = jobs.get_job(root, job_id)
    assert job["attempts"] == 2 and job["progress"] == 1.0
    assert not any(p["user_id"] == "alice" for p in job["losses"])  # the resumed attempt skipped the finished user
    with pytest.raises(jobs.JobError, match="only interrupted or cancelled"):
        jobs.resume(root, job_id)


READER = textwrap.dedent("""
    import json, sys, time
    from oppu.store import Store
    store, errors, polls, deadline = Store(sys.argv[1]), [], 0, time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        try:
            store.latest_runs(5); store.counts(); polls += 1
        except Exception as err:
            errors.append(repr(err))
        time.sleep(0.05)
    print(json.dumps({"polls": polls, "errors": errors}))
""")


def test_two_jobs_at_once_with_a_reader_and_a_queue(env):
    root = env / "jobs"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(env / "r.duckdb"), "6"], stdout=subprocess.PIPE,
                              text=True)
    ids = [jobs.submit(_cfg(env, "steps=3 sleep=0.1"), root, runner=FAKE, max_workers=2) for _ in range(3)]
    states = [_state(root, i) for i in ids]
    assert states == ["running", "running", "queued"]  # the third waits for a free slot
    _wait(lambda: all(_state(root, i) == "done" for i in ids), timeout=60)
    report = json.loads(reader.communicate(timeout=30)[0])
    assert report["errors"] == [] and report["polls"] > 5
    store = Store(env / "r.duckdb")
    assert [store.prediction_count(i) for i in ids] == [12, 12, 12]
    third = jobs.get_job(root, ids[2])
    assert third["started"] >= min(jobs.get_job(root, i)["finished"] for i in ids[:2]) - 0.5


# -- the real pipeline -------------------------------------------------------------------------------------------
def test_real_pipeline_job_survives_kill_9_and_resumes(tiny_model_dir, tiny_data_dir, tmp_path):
    """The default runner (`run_experiment`) on the tiny model: progress from the real pipeline, kill -9 while
    personal adapters train, resume on the same run id, then no duplicate rows and every adapter complete."""
    from oppu.config import ModelConfig, TrainConfig
    from oppu.experiment import adapter_folder, adapter_styles
    from oppu.model import adapter_complete

    cfg = RunConfig(task="LaMP_2M", user_ids=("alice", "bob", "carol"), methods=("none", "oppu"),
                    data_dir=str(tiny_data_dir), db=str(tmp_path / "r.duckdb"),
                    artifacts_dir=str(tmp_path / "artifacts"), model=ModelConfig(name=str(tiny_model_dir)),
                    task_adaptation=False, user_train=TrainConfig(epochs=4, batch_size=1, max_length=64))
    root = tmp_path / "jobs"
    job_id = jobs.submit(cfg, root)
    # each user's stage is announced (step 0 of its total) before its first step: wait for a trained step
    seen = _wait(lambda: (j := jobs.get_job(root, job_id))["stage"] == "train_user" and j["loss_history"] and j,
                 timeout=120, every=0.05)
    assert seen["state"] == "running" and seen["stage"] == "train_user" and seen["loss_history"]
    os.kill(seen["pid"], signal.SIGKILL)
    _wait(lambda: _state(root, job_id) == "interrupted", timeout=5)
    jobs.resume(root, job_id)
    _wait(lambda: _state(root, job_id) != "running", timeout=120, every=0.5)
    job = jobs.get_job(root, job_id)
    assert job["state"] == "done", jobs.logs(root, job_id)
    assert job["progress"] == 1.0 and job["attempts"] == 2
    store = Store(cfg.db)
    expected = sum(len(u.queries) for u in _users(tiny_data_dir)) * len(cfg.methods)
    assert store.prediction_count(job_id) == expected
    assert store.done_users(job_id) == set(cfg.user_ids)
    assert store.runs().set_index("run_id").loc[job_id, "status"] == "done"
    for user in cfg.user_ids:
        for style in adapter_styles(cfg):
            assert adapter_complete(adapter_folder(cfg, job_id, user, style))


def _users(data_dir):
    from oppu.data import load_task_data

    return [u for u in load_task_data(str(data_dir), "LaMP_2M").test_users if u.id in ("alice", "bob", "carol")]


# -- command line ------------------------------------------------------------------------------------------------
def _oppu(*argv):
    done = subprocess.run([sys.executable, "-m", "oppu", *argv], check=False, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def test_cli_submit_show_list_logs_resume(tmp_path, tiny_data_dir):
    root = str(tmp_path / "jobs")
    code, _, err = _oppu("jobs", "submit", "--root", root, "--task", "LaMP_2M", "--user-ids", "nosuchuser",
                         "--data", str(tiny_data_dir), "--db", str(tmp_path / "r.duckdb"))
    assert code == 2 and "nosuchuser" in err and "Traceback" not in err and not Path(root).exists()
    # a model folder that does not exist: refused at submit, in one line, before anything is queued
    code, _, err = _oppu("jobs", "submit", "--root", root, "--task", "LaMP_2M", "--users", "1", "--no-adapt",
                         "--data", str(tiny_data_dir), "--db", str(tmp_path / "r.duckdb"),
                         "--model", str(tmp_path / "no-such-model"))
    assert code == 2 and "no model folder" in err and len(err.strip().splitlines()) == 1 and not Path(root).exists()
    # a folder that looks like a model but is not one passes that check and fails in the worker
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    code, out, _ = _oppu("jobs", "submit", "--root", root, "--task", "LaMP_2M", "--users", "1", "--no-adapt",
                         "--data", str(tiny_data_dir), "--db", str(tmp_path / "r.duckdb"), "--model", str(broken))
    job_id = out.strip()
    assert code == 0 and jobs.check_job_id(job_id)
    _wait(lambda: _state(root, job_id) == "failed", timeout=60)
    code, out, _ = _oppu("jobs", "show", job_id, "--root", root)
    assert code == 0 and "failed" in out and "error:" in out and "tokenizer" in out
    code, out, _ = _oppu("jobs", "list", "--root", root)
    assert code == 0 and job_id in out
    code, out, _ = _oppu("jobs", "logs", job_id, "--root", root)
    assert code == 0 and "Traceback" in out
    code, _, err = _oppu("jobs", "resume", job_id, "--root", root)
    assert code == 2 and "retry" in err
    code, out, _ = _oppu("jobs", "retry", job_id, "--root", root)
    assert code == 0 and out.strip() == job_id
    code, _, err = _oppu("jobs", "show", "../../etc/passwd", "--root", root)
    assert code == 2 and "invalid job id" in err


def test_progress_line_shows_bar_user_step_loss_and_eta():
    from oppu.commands.jobs import progress_line

    line = progress_line({"state": "running", "progress": 0.5, "stage": "train_user", "user_index": 2,
                          "users_total": 4, "step": 3, "steps_total": 8, "loss": 1.23456, "elapsed_s": 65,
                          "eta_s": 130}, width=10)
    assert line == ("[#####.....]  50% running · train_user · user 2 of 4 · step 3/8 · loss 1.235 · "
                    "1m05s elapsed · ~2m10s left")


def test_liveness_uses_the_process_on_this_host_and_the_heartbeat_elsewhere(tmp_path):
    import socket

    folder = tmp_path / "20250101-000000-abcdef"
    folder.mkdir()
    (folder / "heartbeat").touch()
    old = time.time() - jobs.STALE_S - 5
    os.utime(folder / "heartbeat", (old, old))
    here = {"job_id": folder.name, "state": "running", "host": socket.gethostname()}
    # our own process is alive but is not that job's worker: a reused pid, so the job is dead
    assert "another process" in dead_reason({**here, "pid": os.getpid()}, folder)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", folder.name])
    cmdline = Path(f"/proc/{sleeper.pid}/cmdline")
    deadline = time.monotonic() + 10
    while folder.name.encode() not in cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)  # until the child has exec'd: before that its command line is still ours (forked)
    try:  # a live worker of the job with a late heartbeat is not declared dead (no second worker on resume)
        assert dead_reason({**here, "pid": sleeper.pid}, folder) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "is gone" in dead_reason({**here, "pid": sleeper.pid}, folder)
    elsewhere = {**here, "host": "another-node", "pid": 1}
    assert "heartbeat" in dead_reason(elsewhere, folder)
    (folder / "heartbeat").touch()
    assert dead_reason(elsewhere, folder) is None


def test_worker_log_reads_config_plan_stages_steps_and_the_cause_of_a_failure(env, capsys):
    """The worker log: resolved config, plan, each stage's start, a line per N steps with loss and speed, its
    end, and a failure's error with its cause; library FutureWarnings stay out of it."""
    import warnings

    def runner(cfg, progress=None, should_stop=None, store=None, run_id=None, job_id=None):
        warnings.warn("`x` is deprecated", FutureWarning)
        progress("adapt:LaMP_2M:plain", 0, 20, None)
        for step in range(1, 21):
            progress("adapt:LaMP_2M:plain", step, 20, 1.0 / step)
        try:
            raise ValueError("the tokenizer has no pad token")
        except ValueError as err:
            raise RuntimeError("task adaptation failed") from err

    root = env / "jobs"
    job_id = jobs.submit(_cfg(env, ""), root, start=False)
    assert jobs.run_worker(root, job_id, runner=runner) == 1
    log = capsys.readouterr().err
    assert "resolved config: {" in log and '"task": "LaMP_2M"' in log
    assert "plan: 1 task adaptation stage(s)" in log
    assert "adapt:LaMP_2M:plain: start (20 steps)" in log
    assert "adapt:LaMP_2M:plain: step 10/20 loss 0.1000" in log and "s/step)" in log
    assert "adapt:LaMP_2M:plain: done in" in log
    assert "failed: RuntimeError: task adaptation failed" in log
    assert "caused by ValueError: the tokenizer has no pad token" in log
    assert "FutureWarning" not in log
    assert jobs.get_job(root, job_id)["error"] == "RuntimeError: task adaptation failed"


@pytest.mark.parametrize("name, says", [("no/such-model", "not in the local Hugging Face cache"),
                                        ("./no-such-folder", "no model folder"),
                                        ("embedded:NoSuchModel", "no GGUF named NoSuchModel")])
def test_submit_refuses_an_unknown_model_at_once_with_a_short_message(env, monkeypatch, name, says):
    from oppu.config import ModelConfig
    from oppu.errors import OppuError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = env / "jobs"
    start = time.monotonic()
    with pytest.raises(OppuError, match=says) as err:
        jobs.submit(_cfg(env, "").replace(model=ModelConfig(name=name)), root)
    assert time.monotonic() - start < 2 and len(str(err.value).splitlines()) == 1 and len(str(err.value)) < 300
    assert not root.exists() or not any(root.iterdir())  # nothing queued


def test_a_failed_job_is_retried_not_resumed(env):
    root = env / "jobs"
    # the job names the fake runner: the worker that `retry` starts must not run the real pipeline (it would
    # load the default model and keep a core busy for minutes after this test)
    job_id = jobs.submit(_cfg(env, "steps=1 sleep=0.01 fail=1"), root, start=False, runner=FAKE)
    jobs.run_worker(root, job_id, runner=fake_runner)
    assert _state(root, job_id) == "failed"
    with pytest.raises(jobs.JobError, match="retry"):
        jobs.resume(root, job_id)
    jobs.retry(root, job_id)
    job = jobs.get_job(root, job_id)
    assert [h["state"] for h in job["history"]][:4] == ["queued", "running", "failed", "retried"]
    # the retried attempt runs the same (failing) job again and ends failed, on its second attempt
    _wait(lambda: _state(root, job_id) == "failed", timeout=60)
    assert jobs.get_job(root, job_id)["attempts"] == 2
