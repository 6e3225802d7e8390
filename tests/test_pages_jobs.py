"""The Train and Analyses pages' job views with AppTest: a sweep launched after a confirmation and listed as one
group with per-member labels and one cancel; the loss chart (one line per user and style, task adaptation
named by its style, integer steps, drawn once); details that follow the job whose state changed; no stale banner."""

from __future__ import annotations

import os
import socket
import time

import pytest
from test_pages import page, plotly_charts, texts

from oppu import jobs
from oppu.config import RunConfig
from oppu.jobs.folder import append_event, read_job, write_job


@pytest.fixture()
def no_workers(monkeypatch):
    """Jobs stay queued: nothing trains during a page test."""
    from oppu.jobs import lifecycle

    monkeypatch.setattr(lifecycle, "_spawn", lambda root, job: None)


def _cfg(env, **kw):
    return RunConfig(task="LaMP_2M", users=1, data_dir=str(env["OPPU_DATA"]), db=str(env["OPPU_DB"]),
                     artifacts_dir=str(env["OPPU_ARTIFACTS"]), **kw)


def test_a_k_sweep_is_confirmed_then_listed_as_one_group_and_cancelled_as_a_whole(env, no_workers):
    at = page("analyses")
    next(b for b in at.button if b.key == "run-k").click().run()
    assert not at.exception
    assert "This launches 5 runs" in texts(at) and "k=0, k=1, k=2, k=4, k=8" in texts(at)
    assert not env["OPPU_JOBS"].exists() or not any(env["OPPU_JOBS"].iterdir())  # nothing before the confirm
    next(b for b in at.button if b.key == "launch-k").click().run()
    listed = jobs.list_jobs(env["OPPU_JOBS"])
    assert len(listed) == 5 and len({j["sweep"]["id"] for j in listed}) == 1
    assert sorted(j["sweep"]["label"] for j in listed) == ["k=0", "k=1", "k=2", "k=4", "k=8"]
    assert {j["state"] for j in listed} == {"queued"}
    assert "Submitted sweep" in texts(at)
    at.run()  # the notice stays while the sweep's runs are queued
    assert "sweep for LaMP_2M is under way: 0 of 5 runs done" in texts(at)

    train = page("train")
    assert not train.exception
    assert "**Sweep `k`** · LaMP_2M · 0 of 5 runs done · 0 running · 5 queued" in texts(train)
    history = train.dataframe[-1].value
    assert sorted(history["sweep"]) == [f"k sweep · k={k}" for k in (0, 1, 2, 4, 8)]
    next(b for b in train.button if b.key.startswith("cancel-sweep-")).click().run()
    assert {j["state"] for j in jobs.list_jobs(env["OPPU_JOBS"])} == {"cancelled"}


def test_members_of_a_k_sweep_share_the_task_adapted_base_of_a_shared_style(env):
    from dataclasses import asdict

    from oppu.adaptation import adaptation_key
    from oppu.analyses import sweep_members
    from oppu.experiment import run_styles

    keys = {}
    for label, cfg in sweep_members("k", _cfg(env)):
        for style in run_styles(cfg):
            # what run_experiment passes adapt_task, which builds the cache key from it
            keys.setdefault(style.key, set()).add(adaptation_key(
                model=cfg.model.name, task=cfg.task, data="fp", peft=asdict(cfg.adaptation_peft),
                train=asdict(cfg.adaptation_train), style=asdict(style), retriever=cfg.retrieval.retriever))
    assert len(keys["plain"]) == 1  # every member's plain base is the same cached task LoRA


def _loss_events(folder):
    append_event(folder, {"stage": "started", "users_total": 2})
    for step in (1, 2, 3):
        append_event(folder, jobs.progress_event("adapt:LaMP_2M:plain", step, 3, 3.0 - step / 2))
    for user, style in (("alice", "plain"), ("alice", "rag1"), ("bob", "plain")):
        for step in (1, 2):
            append_event(folder, jobs.progress_event(f"user:{user}:{style}", step, 2, 2.0 / step))


def test_loss_chart_has_one_line_per_user_and_style_integer_steps_and_is_drawn_once(env, no_workers):
    root = env["OPPU_JOBS"]
    job_id = jobs.submit(_cfg(env), root, start=False)
    folder = jobs.job_dir(root, job_id)
    _loss_events(folder)
    job = read_job(root, job_id)
    # a running job of this very process: alive, so it stays running
    job.update(state="running", pid=os.getpid(), host=socket.gethostname(), started=time.time())
    write_job(folder / "job.json", job)
    (folder / "heartbeat").touch()
    at = page("train")
    assert not at.exception
    (fig,) = plotly_charts(at)  # the running card draws it; the details below do not draw it again
    assert sorted(t.name for t in fig.data) == ["alice (plain)", "alice (rag1)", "bob (plain)",
                                                "task adaptation (plain)"]
    assert "__task__" not in {t.name for t in fig.data}
    assert fig.layout.xaxis.tickformat == "d" and fig.layout.xaxis.dtick == 1
    job.update(state="done", finished=time.time())
    write_job(folder / "job.json", job)
    at.run()
    assert len(plotly_charts(at)) == 1  # finished: drawn once, in the details


def test_details_follow_the_job_that_was_cancelled_and_offer_resume_at_once(env, no_workers):
    root = env["OPPU_JOBS"]
    older = jobs.submit(_cfg(env), root, start=False)
    time.sleep(0.01)
    newer = jobs.submit(_cfg(env), root, start=False)
    at = page("train")
    at.selectbox(key="train-detail").set_value(older).run()
    assert at.selectbox(key="train-detail").value == older
    jobs.cancel(root, newer)  # e.g. from the CLI or its card
    at.run()
    assert at.selectbox(key="train-detail").value == newer
    assert any(b.label == "Resume" for b in at.button)


def test_the_submitted_banner_goes_once_its_job_is_under_way(env, no_workers, monkeypatch):
    submitted = []
    monkeypatch.setattr(jobs, "submit", lambda cfg, root: submitted.append(cfg) or "job-form")
    at = page("train")
    at.button[0].click().run()
    assert "Submitted job `job-form`" in at.success[0].value
    at.session_state["train-submitted"] = (["job-form"], "Submitted job `job-form`", time.time() - 60)
    at.run()
    assert not any("Submitted job" in s.value for s in at.success)
