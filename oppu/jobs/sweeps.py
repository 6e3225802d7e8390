"""Sweeps as one object: the runs of one analysis submitted, listed, estimated and cancelled together.

A sweep is an id shared by its member jobs: each member's job.json carries `sweep = {id, kind, task, label,
planned}` (`label` is the member's setting, e.g. `k=4`, with its seed in a sweep run under several seeds:
`k=4 · seed 1`, the seeds of one setting sharing a `seed_group`). There is no sweep file to get out of step with
its jobs: `group_sweeps` derives each sweep's planned/done/running counts from the job list, and `cancel_sweep`
cancels every member. `preview` says before anything is submitted what a sweep will launch (runs, users,
estimated time from step costs measured by earlier jobs under the same root).
Members share a task-adapted base wherever their adaptation settings agree: the cache key
(`oppu.adaptation.adaptation_key`) covers only what the adaptation depends on, so the first member trains it
and the others find it in the cache; the estimate counts each shared stage once.
"""

from __future__ import annotations

import os
import secrets
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oppu.jobs.folder import FINAL_STATES, JOB_ID_RE, JobError, read_events

SWEEP_ID_PREFIX = "sweep-"


def new_sweep_id() -> str:
    return SWEEP_ID_PREFIX + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def submit_sweep(members: Sequence[tuple[str, Any]], root: str | os.PathLike[str], *, kind: str,
                 **submit_options: Any) -> str:
    """Submit every `(label, RunConfig)` of one sweep as a job tagged with one sweep id; returns that id."""
    from oppu.jobs.lifecycle import submit

    if not members:
        raise JobError(f"sweep {kind!r} has no runs to submit")
    sweep_id = new_sweep_id()
    task = members[0][1].task
    for label, cfg in members:
        submit(cfg, root, sweep={"id": sweep_id, "kind": kind, "task": task, "label": str(label),
                                 "planned": len(members)}, **submit_options)
    return sweep_id


def group_sweeps(job_list: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per sweep in `job_list` (newest first): id, kind, task, planned, done, failed, cancelled,
    running, queued, active (members not final), state (one word) and members (the jobs, oldest first)."""
    groups: dict[str, dict[str, Any]] = {}
    for job in job_list:
        sweep = job.get("sweep") or {}
        if not sweep.get("id"):
            continue
        group = groups.setdefault(sweep["id"], {"id": sweep["id"], "kind": sweep.get("kind"),
                                                "task": sweep.get("task"), "planned": sweep.get("planned"),
                                                "members": [], "created": job.get("created", 0)})
        group["members"].append(job)
        group["created"] = min(group["created"], job.get("created", 0))
    out = []
    for group in groups.values():
        group["members"].sort(key=lambda j: j.get("created", 0))
        states = [j.get("state") for j in group["members"]]
        for state in ("done", "failed", "cancelled", "running", "queued", "interrupted"):
            group[state] = states.count(state)
        group["planned"] = int(group["planned"] or len(states))
        group["active"] = sum(1 for s in states if s not in FINAL_STATES and s != "interrupted")
        group["state"] = ("running" if group["running"] else "queued" if group["queued"] else
                          "done" if group["done"] == group["planned"] else "stopped")
        out.append(group)
    return sorted(out, key=lambda g: g["created"], reverse=True)


def cancel_sweep(root: str | os.PathLike[str], sweep_id: str) -> dict[str, str]:
    """Cancel every member of a sweep that is still queued or running; returns job id -> state afterwards."""
    from oppu.jobs.lifecycle import cancel, list_jobs

    members = [j for j in list_jobs(root) if (j.get("sweep") or {}).get("id") == sweep_id]
    if not members:
        raise JobError(f"no sweep {sweep_id} under {root}: the job list groups the sweeps it has")
    # queued ones first: a cancelled running member frees its slot, which must not start the next member
    order = sorted(members, key=lambda j: j.get("state") != "queued")
    return {j["id"]: cancel(root, j["id"]) if j.get("state") in ("queued", "running") else j["state"]
            for j in order}


def measured_unit_costs(root: str | os.PathLike[str], model: str | None = None, recent: int = 20
                        ) -> dict[str, float]:
    """Seconds per unit of each kind (`adapt`/`user` steps, `generate` rows), the median over the latest attempts
    of up to `recent` earlier jobs under `root` (of `model` when given); empty when nothing was measured."""
    from oppu.jobs.progress import unit_costs

    folders = sorted((f for f in Path(root).iterdir() if JOB_ID_RE.fullmatch(f.name)), reverse=True) \
        if Path(root).is_dir() else []
    per_kind: dict[str, list[float]] = {}
    seen = 0
    for folder in folders:
        if seen >= recent:
            break
        if model is not None:
            import json

            try:
                job = json.loads((folder / "job.json").read_text())
            except (OSError, ValueError):
                continue
            if ((job.get("config") or {}).get("model") or {}).get("name") != model:
                continue
        events = read_events(folder)
        start = max((i for i, e in enumerate(events) if e.get("stage") in ("started", "resumed")), default=-1)
        costs = unit_costs(events[start + 1:])
        if costs:
            seen += 1
        for kind, value in costs.items():
            per_kind.setdefault(kind, []).append(value)
    return {kind: statistics.median(values) for kind, values in per_kind.items()}


def preview(members: Sequence[tuple[str, Any]], root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What submitting `members` would launch: per member its label, users, training steps and estimated
    seconds, and totals (task adaptation shared between members counted once). `measured` says whether the
    costs came from earlier jobs (else the plan's defaults)."""
    from oppu.data import load_task_data
    from oppu.jobs.plan import estimate_s, plan_run, plan_units

    if not members:
        return {"runs": 0, "users": 0, "seconds": 0.0, "measured": False, "members": []}
    model = members[0][1].model.name
    costs = measured_unit_costs(root, model) if root is not None else {}
    data_cache: dict[tuple[str, str], Any] = {}
    adapted: set[tuple] = set()
    rows, users, total = [], set(), 0.0
    for label, cfg in members:
        key = (cfg.data_dir, cfg.task)
        if key not in data_cache:
            data_cache[key] = load_task_data(cfg.data_dir, cfg.task)
        stages = plan_run(cfg, data_cache[key])
        shared = []
        for stage in stages:
            # the same style under the same adaptation settings is the same cached task LoRA
            ident = (stage.key, repr(cfg.adaptation_peft), repr(cfg.adaptation_train), cfg.model.name)
            if stage.kind == "adapt":
                if ident in adapted:
                    continue
                adapted.add(ident)
            shared.append(stage)
        member_users = {s.key.split(":")[1] for s in stages if s.kind == "user"}
        users |= member_users
        seconds = estimate_s(shared, costs)
        total += seconds
        units = plan_units(shared)
        rows.append({"label": label, "users": len(member_users), "adapt_steps": units["adapt"],
                     "user_steps": units["user"], "answers": units["generate"], "seconds": seconds})
    return {"runs": len(members), "users": len(users), "seconds": total, "measured": bool(costs), "members": rows}
