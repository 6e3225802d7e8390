"""The run plan and progress against it: every stage's total is known before the run starts and equals what the
real run reports; progress covers task adaptation and generation, and time left comes from measured step times."""

from __future__ import annotations

import pytest

from oppu import jobs
from oppu.config import GenerationConfig, ModelConfig, RunConfig, TrainConfig
from oppu.jobs.plan import estimate_s, plan_run, plan_units, steps_for


@pytest.fixture()
def cfg(tiny_model_dir, tiny_data_dir, tmp_path):
    return RunConfig(task="LaMP_2M", methods=("none", "rag", "oppu", "oppu+rag"), users=2,
                     data_dir=str(tiny_data_dir), db=str(tmp_path / "r.duckdb"),
                     artifacts_dir=str(tmp_path / "art"), model=ModelConfig(name=str(tiny_model_dir), device="cpu"),
                     adaptation_train=TrainConfig(epochs=2, lr=1e-2, batch_size=4, max_length=96, max_examples=5),
                     user_train=TrainConfig(epochs=2, lr=1e-2, batch_size=3, max_length=96),
                     generation=GenerationConfig(max_new_tokens=2, batch_size=8))


def test_steps_are_counted_as_the_loops_batch():
    from oppu.train import make_batches

    for n, bs, ep in ((0, 4, 2), (1, 4, 2), (8, 4, 2), (9, 4, 3), (5, 16, 1)):
        assert steps_for(n, bs, ep) == len(make_batches(n, bs, ep, 0))


def test_plan_totals_equal_what_the_run_reports(cfg, tiny_task_data):
    from oppu.data import load_task_data
    from oppu.experiment import run_experiment

    stages = plan_run(cfg, load_task_data(cfg.data_dir, cfg.task))
    kinds = [s.kind for s in stages]
    assert kinds.count("adapt") == 2 and kinds.count("user") == 4 and kinds[-1] == "generate"
    events = []
    run_experiment(cfg, progress=lambda *e: events.append(e))
    reported = {}
    for stage, step, total, _ in events:
        if stage.startswith(("adapt:", "user:")):
            assert reported.setdefault(stage, total) == total  # announced before the first step, never changed
    assert reported == {s.key: s.total for s in stages if s.kind != "generate"}
    first = {}
    for stage, step, total, loss in events:
        first.setdefault(stage, (step, loss))
    assert all(first[k] == (0, None) for k in reported)  # every training stage opens with (stage, 0, total)
    answered = sum(step for stage, step, total, _ in events if stage.startswith("generate:") and step == total)
    assert answered == next(s.total for s in stages if s.kind == "generate")
    # a resumed run leaves the finished users out
    resumed = plan_run(cfg, load_task_data(cfg.data_dir, cfg.task), done_users=["alice"])
    assert not any("alice" in s.key for s in resumed) and plan_units(resumed)["user"] < plan_units(stages)["user"]
    assert estimate_s(stages, {"adapt": 1.0, "user": 1.0, "generate": 0.0}) == \
        plan_units(stages)["adapt"] + plan_units(stages)["user"]


PLAN = {"t": 0, "stage": "plan", "stages": [
    {"key": "adapt:T:plain", "kind": "adapt", "total": 10, "label": ""},
    {"key": "user:a:plain", "kind": "user", "total": 4, "label": ""},
    {"key": "user:b:plain", "kind": "user", "total": 4, "label": ""},
    {"key": "generate", "kind": "generate", "total": 20, "label": ""}]}


def _adapt(t, step, loss=1.0):
    return {"t": t, **jobs.progress_event("adapt:T:plain", step, 10, loss if step else None)}


def test_progress_during_task_adaptation_has_a_total_a_bar_and_time_left_and_no_user():
    events = [{"t": 0, "stage": "started", "users_total": 2}, PLAN, _adapt(1, 0)]
    events += [_adapt(1 + i, i) for i in range(1, 6)]  # 1 s per adaptation step
    s = jobs.summarize_progress(events, now=6)
    assert s["phase"] == "task adaptation (plain)" and s["step"] == 5 and s["steps_total"] == 10
    assert s["user"] is None and s["user_index"] is None and s["users_done"] == 0
    assert 0 < s["progress"] < 0.5  # adaptation is only part of the work
    # 5 adaptation steps + 8 user steps + 20 rows left, the unmeasured kinds priced relative to the defaults
    assert s["eta_s"] == pytest.approx(5 * 1.0 + 8 * 0.5 + 20 * 0.5)
    assert s["units_done"] == 5 and s["units_total"] == 38


def test_progress_does_not_reach_the_end_before_generation_and_time_left_follows_measured_steps():
    events = [{"t": 0, "stage": "started", "users_total": 2}, PLAN, _adapt(0, 0, None), _adapt(0, 10)]
    events[-1]["steps_total"] = 10
    t = 0.0
    for step in range(1, 5):  # multi-user steps: both users' steps reported together, 2 s per step
        t += 2
        events += [{"t": t, **jobs.progress_event(f"user:{u}:plain", step, 4, 0.5)} for u in "ab"]
    events.append({"t": t, **jobs.progress_event("generate:plain", 0, 20, None)})
    s = jobs.summarize_progress(events, now=t + 1)
    assert s["phase"] == "answering (plain)" and s["users_done"] == 0
    assert s["progress"] < 1.0 and s["eta_s"] > 0
    assert s["unit_costs"]["user"] == pytest.approx(1.0)  # 2 s per step shared by 2 users
    events.append({"t": t + 10, **jobs.progress_event("generate:plain", 20, 20, None)})
    events.append({"t": t + 10, "stage": "users", "users_done": 2, "users_total": 2})
    s = jobs.summarize_progress(events, now=t + 10)
    assert s["progress"] == pytest.approx(1.0) and s["users_done"] == 2


def test_a_cached_task_adaptation_counts_as_done():
    events = [{"t": 0, "stage": "started", "users_total": 2}, PLAN,
              {"t": 1, **jobs.progress_event("adapt:T:plain", 0, 0, None)}]
    assert jobs.summarize_progress(events, now=2)["units_done"] == 10
