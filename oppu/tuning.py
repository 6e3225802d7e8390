"""Choosing settings without looking at test queries (`oppu tune`).

A grid of candidate values (`user_train.lr=5e-4,1e-3`) is run point by point on the validation split
(`oppu.splits`: each test user's most recent history items held out as queries), each point scored by the official
per-query score of the methods the grid's keys act on, and the best point kept. The result is written as a preset
file: the chosen values plus a `_chosen_on` record (split, task, users, every point's score, the command), so
`oppu run --preset tuned.json` applies the choice and every later number can say which split chose what.

Everything here but `tune` is pure: parsing, the grid's points, scoring a frame of per-query scores, choosing.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from oppu.errors import OppuError


class TuneError(OppuError, ValueError):
    """A grid or objective that cannot be tuned."""


@dataclass(frozen=True)
class Point:
    """One grid point, its validation run and its objective (mean official per-query score)."""

    values: Mapping[str, Any]
    run_id: str
    score: float
    queries: int

    def to_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values), "run_id": self.run_id, "score": self.score, "queries": self.queries}


def parse_value(text: str) -> Any:
    """`1e-3` -> 0.001, `3` -> 3, `true` -> True, `bm25` -> "bm25" (JSON where it parses, else the string)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """`["user_train.lr=5e-4,1e-3", "user_train.epochs=2,3"]` -> {key: [values]} (keys checked by the config)."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = str(spec).partition("=")
        key = key.strip()
        parts = [v for v in values.split(",") if v.strip()]
        if not sep or not key or not parts:
            raise TuneError(f"grid {spec!r} is not KEY=V1,V2: e.g. user_train.lr=5e-4,1e-3")
        if key in grid:
            raise TuneError(f"grid key {key!r} is given twice: list all its values once")
        if key in ("split", "validation_items", "task", "methods", "users", "user_ids", "data_dir", "db"):
            raise TuneError(f"{key!r} says what is evaluated, not how: it cannot be tuned")
        grid[key] = [parse_value(v) for v in parts]
    if not grid:
        raise TuneError("nothing to tune: give at least one KEY=V1,V2")
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest, values in the order given."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def objective_methods(methods: Sequence[str], keys: Sequence[str]) -> list[str]:
    """The methods a grid over `keys` can change: all of them, unless every key is a personal-adapter setting
    (`user_train.*`, `user_peft.*`), which only methods with an adapter feel."""
    from oppu.config import METHODS

    if all(k.startswith(("user_train.", "user_peft.")) for k in keys):
        chosen = [m for m in methods if METHODS[m].adapter]
        if not chosen:
            raise TuneError(f"the grid tunes personal adapters but no method uses one ({', '.join(methods)}): "
                            "add oppu or oppu+rag to the methods")
        return chosen
    return list(methods)


def point_score(scores, methods: Sequence[str]) -> tuple[float, int]:
    """(mean per-query score over `methods`, number of scored rows) of one run's `Store.scores` frame."""
    part = scores[scores["method"].isin(list(methods))]
    if part.empty:
        raise TuneError(f"the validation run has no scored answers of {', '.join(methods)}")
    return float(part["score"].mean()), len(part)


def choose(points: Sequence[Point], lower_is_better: bool) -> Point:
    """The best point; a tie goes to the earlier point (grid order), so the choice does not depend on noise in
    the last digit of a float sum."""
    if not points:
        raise TuneError("no grid point was scored")
    sign = 1.0 if lower_is_better else -1.0
    return min(enumerate(points), key=lambda ip: (sign * round(ip[1].score, 12), ip[0]))[1]


def tuned_preset(base_preset: str | None, grid: Mapping[str, Sequence[Any]], points: Sequence[Point], best: Point,
                 *, task: str, users: Sequence[str], validation_items: int, metric: str, lower_is_better: bool,
                 methods: Sequence[str], command: str) -> dict[str, Any]:
    """The preset file `oppu tune` writes: the chosen values (nested, as preset files are) on top of the base
    preset's, and the record of how they were chosen."""
    from oppu.config import load_preset, merge_config, nest_dotted

    layer = merge_config(load_preset(base_preset) if base_preset else {}, nest_dotted(best.values))
    chosen = ", ".join(f"{k}={v}" for k, v in best.values.items())
    return {
        "_about": (f"Chosen by `{command}` on the validation split of {task} ({len(users)} users, their "
                   f"{validation_items} most recent history items each): {chosen}."),
        "_chosen_on": {"split": "validation", "validation_items": validation_items, "task": task,
                       "users": list(users), "objective": f"mean official {metric} of {', '.join(methods)}",
                       "lower_is_better": lower_is_better, "grid": {k: list(v) for k, v in grid.items()},
                       "points": [p.to_dict() for p in points], "chosen": dict(best.values),
                       "base_preset": base_preset, "command": command},
        **layer,
    }


def tune(base, grid: Mapping[str, Sequence[Any]], store, *, base_preset: str | None = None, command: str = "",
         run: Callable[..., str] | None = None, progress: Callable[..., None] | None = None,
         on_point: Callable[[Point], None] | None = None) -> dict[str, Any]:
    """Run every grid point of `base` (a RunConfig) on the validation split, choose, return the preset dict.

    `run` is `oppu.experiment.run_experiment` unless given (tests pass a tiny one)."""
    from oppu.config import build_config
    from oppu.experiment import select_users
    from oppu.metrics import row_score_name
    from oppu.splits import run_data

    if run is None:
        from oppu.experiment import run_experiment as run
    base = build_config(None, {"split": "validation", "tag": "tune"}, base=base)
    # Every key and value is checked before the first (long) run: a typo fails now, not after an hour.
    configs = [(values, build_config(None, values, base=base)) for values in grid_points(grid)]
    methods = objective_methods(base.methods, list(grid))
    users = [u.id for u in select_users(run_data(base), base)]
    metric, lower = row_score_name(base.task)
    points = []
    for values, cfg in configs:
        run_id = run(cfg, store=store, progress=progress)
        score, n = point_score(store.scores([run_id]), methods)
        point = Point(values, run_id, score, n)
        points.append(point)
        if on_point is not None:
            on_point(point)
    best = choose(points, lower)
    return tuned_preset(base_preset, grid, points, best, task=base.task, users=users,
                        validation_items=base.validation_items, metric=metric, lower_is_better=lower,
                        methods=methods, command=command)
