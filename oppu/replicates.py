"""Replicates: one config run under several seeds, one run per seed, all sharing a `seed_group`.

A seed sets what makes two runs of one config differ: the personal adapters' initial draw, their dropout masks
and example order (`user_train.seed`), and sampling when decoding samples (`generation.seed`). The task-adapted
base is not re-drawn: `adaptation_train.seed` stays as configured, so every seed trains its adapters on, and
answers with, the same cached task-adapted base, and the spread across seeds is the spread of the personal part.
The stored config of each run records its seeds and `seed_group`; `oppu.stats` resamples the seeds together with
the users.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence

from oppu.config import ConfigError, GenerationConfig, RunConfig, TrainConfig

VARIED = ("user_train.seed", "generation.seed")
"""The config keys a replicate's seed sets."""
SHARED = ("adaptation_train.seed",)
"""Seed keys every replicate keeps: the task-adapted base is the same for all of them."""


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """`"0,1,2"` (or a list of ints) -> [0, 1, 2]; ConfigError for a bad or repeated seed."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    seeds = []
    for part in parts:
        if part == "":
            continue
        try:
            seed = int(part)
        except (TypeError, ValueError):
            raise ConfigError(f"seed {part!r} is not an integer: pass seeds as a comma list, e.g. 0,1,2") from None
        if seed < 0:
            raise ConfigError(f"seed {seed} is negative: seeds are integers >= 0")
        if seed in seeds:
            raise ConfigError(f"seed {seed} is repeated: each seed runs once")
        seeds.append(seed)
    if not seeds:
        raise ConfigError("no seeds given: pass a comma list, e.g. 0,1,2")
    return seeds


def new_group_id(cfg: RunConfig) -> str:
    return f"{cfg.task}-seeds-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def with_seed(cfg: RunConfig, seed: int, group: str) -> RunConfig:
    """`cfg` as the replicate of `group` under `seed` (the `VARIED` keys set, the `SHARED` ones kept)."""
    import dataclasses

    user_train: TrainConfig = dataclasses.replace(cfg.user_train, seed=int(seed))
    generation: GenerationConfig = dataclasses.replace(cfg.generation, seed=int(seed))
    return cfg.replace(user_train=user_train, generation=generation, seed_group=group)


def seed_configs(cfg: RunConfig, seeds: Sequence[int], group: str | None = None) -> list[RunConfig]:
    """One config per seed, all in one group (a new group id unless `group` is given)."""
    seeds = parse_seeds(seeds)
    group = group or cfg.seed_group or new_group_id(cfg)
    return [with_seed(cfg, s, group) for s in seeds]


def run_seeds(cfg: RunConfig, seeds: Sequence[int], progress: Callable | None = None,
              should_stop: Callable[[], bool] | None = None, group: str | None = None,
              on_run: Callable[[int, str], None] | None = None) -> tuple[str, list[str]]:
    """Run `cfg` once per seed with `oppu.experiment.run_experiment`; returns (group id, run ids by seed).

    Runs one after the other; the first trains (or reuses) the task-adapted base and the others reuse it from the
    cache. `on_run(seed, run_id)` is called after each run. A stop request ends the current run as `cancelled`
    and no further seed starts.
    """
    from oppu.experiment import run_experiment

    configs = seed_configs(cfg, seeds, group)
    run_ids = []
    for seed_cfg in configs:
        if should_stop is not None and should_stop():
            break
        run_id = run_experiment(seed_cfg, progress=progress, should_stop=should_stop)
        run_ids.append(run_id)
        if on_run is not None:
            on_run(seed_cfg.user_train.seed, run_id)
    return configs[0].seed_group, run_ids
