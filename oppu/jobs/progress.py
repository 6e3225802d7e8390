"""Progress of a job, derived from its event log: pure functions, tested without a worker.

`progress_event` turns one report of the runner into the JSON event the worker appends to `progress.jsonl`;
`summarize_progress` reads the events back into the position shown by `oppu jobs show` and the dashboard.
"""

from __future__ import annotations

from typing import Any

from oppu.jobs.folder import JobError

_LOSS_HISTORY = 500


def progress_event(*args: Any) -> dict[str, Any]:
    """One runner progress report -> a JSON event. Accepts a dict event, or `run_experiment`'s positional
    `(stage, step, total, loss)` where stage is `adapt:<task>:<style>`, `user:<user id>:<style>`,
    `generate:<style>` or `users`. Every positional event keeps the stage as reported in `key`."""
    if len(args) == 1 and isinstance(args[0], dict):
        return dict(args[0])
    if len(args) != 4:
        raise JobError(f"progress: expected a dict or (stage, step, total, loss), got {len(args)} arguments")
    stage, step, total, loss = args
    stage = str(stage)
    if stage == "users":
        return {"stage": "users", "users_done": step, "users_total": total}
    event: dict[str, Any] = {"stage": stage, "key": stage, "step": step, "steps_total": total, "loss": loss}
    if stage.startswith("adapt:"):
        event.update(stage="task_adaptation", style=stage.split(":", 2)[-1] if stage.count(":") >= 2 else "")
    elif stage.startswith("user:"):
        user, _, style = stage[len("user:"):].rpartition(":")
        event.update(stage="train_user", user=user or style, style=style if user else "")
    elif stage.startswith("generate"):
        event.update(stage="generate", style=stage.partition(":")[2])
    return event


def _kind(event: dict[str, Any]) -> str | None:
    return {"task_adaptation": "adapt", "train_user": "user", "generate": "generate"}.get(event.get("stage"))


def unit_costs(events: list[dict[str, Any]]) -> dict[str, float]:
    """Measured seconds per unit (training step, generated row) of each kind in one attempt's events.

    The time between two consecutive events of the same kind is what the later one's new units took (a
    multi-user step reports all its users at once: its time is shared by their steps). Gaps across a change of
    kind hold other work (loading, profiles): that step is left out. The last 200 measurements of a kind count.
    """
    spans: dict[str, list[tuple[float, float]]] = {}
    reached: dict[str, int] = {}
    previous = None
    unmeasured_t = None
    for e in events:
        kind = _kind(e)
        if kind is None:
            previous = None if e.get("stage") in ("started", "resumed", "plan") else previous
            continue
        key = e.get("key") or f"{kind}:{e.get('user')}:{e.get('style')}"
        step = int(e.get("step") or 0)
        units = step if kind == "generate" and step == e.get("steps_total") else max(0, step - reached.get(key, 0))
        if kind != "generate":
            reached[key] = max(reached.get(key, 0), step)
        if e.get("loss") is None and kind != "generate":
            units = 0  # an announcement (step 0, or the step a checkpoint continues from) is no work done
        if previous is None or _kind(previous) != kind:
            unmeasured_t = e.get("t")  # this step's time is unknown, also for the users reported with it
        elif units > 0 and e.get("t") != unmeasured_t:
            spans.setdefault(kind, []).append((float(e["t"]) - float(previous["t"]), units))
        previous = e
    return {k: sum(dt for dt, _ in v[-200:]) / sum(u for _, u in v[-200:]) for k, v in spans.items()
            if sum(u for _, u in v[-200:]) > 0 and sum(dt for dt, _ in v[-200:]) > 0}


def _phase(event: dict[str, Any] | None, training: list[str]) -> str:
    if event is None:
        return "starting"
    kind = _kind(event)
    if kind == "adapt":
        return f"task adaptation ({event.get('style') or 'plain'})"
    if kind == "user":
        return f"training {len(training) or 1} user(s) ({event.get('style') or 'plain'})"
    if kind == "generate":
        return f"answering ({event.get('style') or 'plain'})"
    return {"done": "done", "users": "saving results"}.get(str(event.get("stage")), "starting")


def summarize_progress(events: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """Derive the job's position from its progress events (pure: tested without a worker).

    Only the latest attempt counts (events after the last `started`/`resumed`). With a `plan` event (the worker
    writes `oppu.jobs.plan.plan_run`'s stages first) progress is the work done against the whole plan, task
    adaptation and generation included, each kind weighted by its measured time per unit, and the time left is
    the remaining units at those measured costs (None until the first measurement). Without a plan, users are
    counted from the runner's `users` reports and the ETA extrapolates the per-user rate. Ray shares (events
    carrying `share`) are added up.
    """
    out: dict[str, Any] = {"stage": None, "phase": "starting", "user": None, "user_index": None,
                           "users_done": None, "users_total": None, "users_training": [], "step": None,
                           "steps_total": None, "loss": None, "losses": [], "loss_history": [], "progress": None,
                           "eta_s": None, "units_done": None, "units_total": None, "unit_costs": {}}
    start = max((i for i, e in enumerate(events) if e.get("stage") in ("started", "resumed")), default=-1)
    plan = next((e for e in reversed(events) if e.get("stage") == "plan"), None)
    if plan is not None and start >= 0 and events.index(plan) < start:
        plan = None  # a plan of an older attempt: this one (a resume) writes its own
    before = int(events[start].get("users_done_before") or 0) if start >= 0 else 0
    total = events[start].get("users_total") if start >= 0 else None
    events = events[start + 1:]
    trained: dict[Any, list[str]] = {}
    done: dict[Any, int] = {}
    within: dict[Any, float] = {}
    first_train_t = None
    reached: dict[str, int] = {}
    totals: dict[str, int] = {}
    generated = 0
    last_work = None
    for e in events:
        share = e.get("share")
        if e.get("users_total"):
            total = e["users_total"] if share is None or e.get("stage") == "ray" else total
        if e.get("stage") == "users":
            done[share] = int(e.get("users_done") or 0)
            within[share] = 0.0
        elif e.get("stage") == "train_user":
            first_train_t = first_train_t if first_train_t is not None else e.get("t")
            users = trained.setdefault(share, [])
            if e.get("user") not in users:
                users.append(e.get("user"))
            steps = e.get("steps_total")
            within[share] = min(float(e.get("step") or 0) / steps, 1.0) if steps else 0.0
        kind = _kind(e)
        if kind is not None:
            last_work = e
            key = e.get("key") or ""
            if kind == "generate":
                if e.get("step") and e.get("step") == e.get("steps_total"):
                    generated += int(e["step"])
            else:
                totals[key] = int(e.get("steps_total") or 0)
                # a cached task LoRA is announced with total 0: nothing left to train
                reached[key] = max(reached.get(key, 0), int(e.get("step") or 0)) if totals[key] else -1
        if isinstance(e.get("loss"), (int, float)):
            out["losses"].append({"step": e.get("step"), "loss": float(e["loss"]), "user_id": e.get("user"),
                                  "style": e.get("style") or "", "stage": e.get("stage")})
        for key in ("stage", "user", "step", "steps_total"):
            if key in e:
                out[key] = e[key]
    out["losses"] = out["losses"][-_LOSS_HISTORY:]
    out["loss_history"] = [p["loss"] for p in out["losses"]]
    out["loss"] = out["loss_history"][-1] if out["loss_history"] else None
    training = sorted({str(k.split(":")[1]) for k, r in reached.items()
                       if k.startswith("user:") and 0 < r < totals.get(k, 0)})
    out["users_training"] = training
    out["phase"] = _phase(last_work if out["stage"] != "done" else {"stage": "done"}, training)
    if out["stage"] != "train_user":
        out["user"] = None
    if plan is not None:
        _against_plan(out, plan, reached, generated, unit_costs(events), now)
    if total:
        finished = min(before + sum(done.values()), int(total))
        if out["stage"] == "done":
            finished = int(total)
        out.update(users_total=int(total), users_done=finished)
        out["user_index"] = min(finished + 1, int(total)) if out["stage"] == "train_user" else None
        if plan is None:
            in_progress = sum(max(len(u) - 1 + within.get(s, 0.0), 0.0) for s, u in trained.items())
            current = min(max(before + in_progress, float(finished)), float(total))
            if out["stage"] == "done":
                current = float(total)
            out["progress"] = current / total
            if out["stage"] == "train_user":
                out["user_index"] = min(int(current) + 1, int(total))
            if first_train_t is not None and current > before and current < total:
                out["eta_s"] = (now - first_train_t) * (total - current) / (current - before)
    if out["stage"] == "done":
        out.update(progress=1.0, eta_s=None)
    return out


def _against_plan(out: dict[str, Any], plan: dict[str, Any], reached: dict[str, int], generated: int,
                  costs: dict[str, float], now: float) -> None:
    """Progress and time left of the plan's stages from what the events reached."""
    from oppu.jobs.plan import DEFAULT_UNIT_S

    done_units: dict[str, float] = {}
    left_units: dict[str, float] = {}
    gen_total = 0
    for stage in plan.get("stages") or []:
        kind, key, size = stage["kind"], stage["key"], int(stage["total"])
        if kind == "generate":
            gen_total += size
            continue
        got = reached.get(key, 0)
        got = size if got < 0 else min(got, size)
        done_units[kind] = done_units.get(kind, 0) + got
        left_units[kind] = left_units.get(kind, 0) + size - got
    gen_done = min(generated, gen_total)
    done_units["generate"] = gen_done
    left_units["generate"] = gen_total - gen_done
    out["units_done"] = int(sum(done_units.values()))
    out["units_total"] = int(sum(done_units.values()) + sum(left_units.values()))
    out["unit_costs"] = dict(costs)
    # a kind not measured yet is priced like the measured ones relative to the defaults (same machine)
    scale = (sum(costs[k] / DEFAULT_UNIT_S[k] for k in costs) / len(costs)) if costs else None
    price = {k: costs.get(k, DEFAULT_UNIT_S[k] * (scale or 1.0)) for k in DEFAULT_UNIT_S}
    spent = sum(units * price[k] for k, units in done_units.items())
    remaining = sum(units * price[k] for k, units in left_units.items())
    out["progress"] = spent / (spent + remaining) if spent + remaining > 0 else 0.0
    out["eta_s"] = remaining if costs else None
