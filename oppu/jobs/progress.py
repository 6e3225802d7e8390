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
    `(stage, step, total, loss)` where stage is `adapt:<task>`, `user:<user id>:<style>` or `users`."""
    if len(args) == 1 and isinstance(args[0], dict):
        return dict(args[0])
    if len(args) != 4:
        raise JobError(f"progress: expected a dict or (stage, step, total, loss), got {len(args)} arguments")
    stage, step, total, loss = args
    stage = str(stage)
    if stage == "users":
        return {"stage": "users", "users_done": step, "users_total": total}
    event: dict[str, Any] = {"stage": stage, "step": step, "steps_total": total, "loss": loss}
    if stage.startswith("adapt:"):
        event.update(stage="task_adaptation", user="__task__")
    elif stage.startswith("user:"):
        user, _, style = stage[len("user:"):].rpartition(":")
        event.update(stage="train_user", user=user or style, style=style if user else "")
    return event


def summarize_progress(events: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """Derive the job's position from its progress events (pure: tested without a worker).

    Only the latest attempt counts (events after the last `started`/`resumed`). Users are counted as done from
    the runner's `users` reports and, between them, from the users whose training began; Ray shares (events
    carrying `share`) are added up. The ETA extrapolates the per-user rate since the first user's training.
    """
    out: dict[str, Any] = {"stage": None, "user": None, "user_index": None, "users_done": None,
                           "users_total": None, "step": None, "steps_total": None, "loss": None, "losses": [],
                           "loss_history": [], "progress": None, "eta_s": None}
    start = max((i for i, e in enumerate(events) if e.get("stage") in ("started", "resumed")), default=-1)
    before = int(events[start].get("users_done_before") or 0) if start >= 0 else 0
    total = events[start].get("users_total") if start >= 0 else None
    events = events[start + 1:]
    trained: dict[Any, list[str]] = {}
    done: dict[Any, int] = {}
    within: dict[Any, float] = {}
    first_train_t = None
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
        if isinstance(e.get("loss"), (int, float)):
            out["losses"].append({"step": e.get("step"), "loss": float(e["loss"]), "user_id": e.get("user")})
        for key in ("stage", "user", "step", "steps_total"):
            if key in e:
                out[key] = e[key]
    out["losses"] = out["losses"][-_LOSS_HISTORY:]
    out["loss_history"] = [p["loss"] for p in out["losses"]]
    out["loss"] = out["loss_history"][-1] if out["loss_history"] else None
    if total:
        in_progress = sum(max(len(u) - 1 + within.get(s, 0.0), 0.0) for s, u in trained.items())
        current = min(max(before + in_progress, float(sum(done.values()))), float(total))
        if out["stage"] == "done":
            current = float(total)
        out.update(users_total=int(total), users_done=int(current), progress=current / total,
                   user_index=min(int(current) + 1, int(total)))
        if first_train_t is not None and current > before and current < total:
            out["eta_s"] = (now - first_train_t) * (total - current) / (current - before)
    return out
