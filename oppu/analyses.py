"""The paper's analyses as lists of `RunConfig`: each sweep changes one knob of a base config and tags the runs.

- `k`: retrieved items in the prompt (Fig. 4), for the retrieval methods.
- `activity`: one run over many users; the store bins users by history size afterwards.
- `peft`: LoRA vs IA3 vs prompt tuning as the personal module.
- `history-format`: full history items vs text only (labels dropped).
- `behaviour-shift`: adapters and retrieval see only history before a cutoff date; no cutoff is the reference.

Pure: no model is loaded here (behaviour-shift reads the data's dates when no cutoffs are given).

Comparable by construction: `comparable_runs` picks, among the stored runs, those that differ in the swept knob
alone (same users, data, model and every other setting) and says why each other run was left out. A seed is not
a setting: the replicates of one setting (`oppu.replicates`, one `seed_group`) are pooled for its knob value, and
the intervals resample them as seeds crossed with the users (`oppu.uncertainty.grouped_intervals`).
`sweep_members(..., seeds=...)` repeats every member under each seed, one seed group per member;
`comparable_frame` builds the analysis table over the chosen runs only; `activity_bins` makes equal-count bins of
history size that never split one size over two bins, so every bin has its own label.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from oppu.config import PeftConfig, RetrievalConfig, RunConfig
from oppu.replicates import VARIED

K_VALUES = (0, 1, 2, 4, 8)
ACTIVITY_USERS = 100
CUTOFF_QUANTILES = (0.5, 0.75)


def _k(base: RunConfig, values: Sequence[Any] | None) -> list[RunConfig]:
    return [base.replace(retrieval=RetrievalConfig(retriever=base.retrieval.retriever, k=int(k)), tag="k-sweep")
            for k in (values or K_VALUES)]


def _activity(base: RunConfig, values: Sequence[Any] | None) -> list[RunConfig]:
    users = int(values[0]) if values else max(base.users or 1, ACTIVITY_USERS)
    return [base.replace(users=users, user_ids=None, tag="activity")]


def _peft(base: RunConfig, values: Sequence[Any] | None) -> list[RunConfig]:
    return [base.replace(user_peft=PeftConfig(**{**vars(base.user_peft), "kind": kind}), tag="peft")
            for kind in (values or ("lora", "ia3", "prompt"))]


def _history_format(base: RunConfig, values: Sequence[Any] | None) -> list[RunConfig]:
    return [base.replace(history_format=fmt, tag="history-format") for fmt in (values or ("full", "text_only"))]


def data_cutoffs(base: RunConfig, quantiles: Sequence[float] = CUTOFF_QUANTILES) -> list[str]:
    """Cutoff dates at quantiles of the selected test users' dated history items."""
    from oppu.data import load_task_data
    from oppu.experiment import select_users

    data = load_task_data(base.data_dir, base.task)
    users = select_users(data, base)
    dates = sorted(item.date[:10] for user in users for item in user.history if item.date)
    if not dates:
        raise ValueError(f"behaviour-shift needs dated history items and {data.source} has none: pass cutoff "
                         "dates explicitly (e.g. --values 2020-06-01)")
    return sorted({dates[min(int(q * len(dates)), len(dates) - 1)] for q in quantiles})


def _behaviour_shift(base: RunConfig, values: Sequence[Any] | None) -> list[RunConfig]:
    cutoffs = [str(v) for v in values] if values else data_cutoffs(base)
    return [base.replace(history_cutoff=c, tag="behaviour-shift") for c in (None, *cutoffs)]


SWEEPS: dict[str, Callable[[RunConfig, Sequence[Any] | None], list[RunConfig]]] = {
    "k": _k,
    "activity": _activity,
    "peft": _peft,
    "history-format": _history_format,
    "behaviour-shift": _behaviour_shift,
}


LABELS: dict[str, Callable[[RunConfig], str]] = {
    "k": lambda c: f"k={c.retrieval.k}",
    "activity": lambda c: f"{c.users} users",
    "peft": lambda c: c.user_peft.kind,
    "history-format": lambda c: c.history_format,
    "behaviour-shift": lambda c: f"before {c.history_cutoff}" if c.history_cutoff else "no cutoff",
}
"""Each sweep's member label: the setting of its swept knob (what tells the sweep's jobs apart)."""


def sweep_members(kind: str, base: RunConfig, values: Sequence[Any] | None = None,
                  seeds: Sequence[int] | str | None = None) -> list[tuple[str, RunConfig]]:
    """`(label, config)` per run of one analysis, e.g. `("k=4", cfg)`. With `seeds` every member runs once per
    seed (`oppu.replicates.seed_configs`), the seeds of one member in a seed group of their own, labelled
    `"k=4 · seed 1"`."""
    from oppu.replicates import new_group_id, seed_configs

    members = [(LABELS[kind](cfg), cfg) for cfg in sweep_configs(kind, base, values)]
    if seeds is None:
        return members
    return [(f"{label} · seed {seeded.user_train.seed}", seeded) for label, cfg in members
            for seeded in seed_configs(cfg, seeds, new_group_id(cfg))]


def sweep_configs(kind: str, base: RunConfig, values: Sequence[Any] | None = None) -> list[RunConfig]:
    """The runs of one analysis; `values` overrides the default sweep values (k list, PEFT kinds, cutoffs...)."""
    build = SWEEPS.get(kind)
    if build is None:
        raise ValueError(f"unknown sweep {kind!r}: use one of {', '.join(SWEEPS)}")
    return build(base, values)


# -- comparable by construction ----------------------------------------------------------------------------------
KNOBS: dict[str, tuple[str, ...]] = {
    "k": ("retrieval.k",),
    "peft": ("user_peft.kind",),
    "history-format": ("history_format",),
    "behaviour-shift": ("history_cutoff",),
    "activity": (),
}
"""The config keys each analysis sweeps (activity varies nothing: one run, its users binned)."""
FREE_KEYS = ("tag", "seed_group", "db", "artifacts_dir", "data_dir")
"""Config keys that never make runs incomparable: names and where files live (the data itself is compared by
its fingerprint)."""


@dataclass(frozen=True)
class Comparison:
    """Which stored runs an analysis draws on and why the others were left out."""

    kind: str
    run_ids: tuple[str, ...]
    values: dict[str, str]
    """run id -> its setting of the swept knob (e.g. `k=4`); the seeds of one setting share it."""
    excluded: dict[str, str]
    """run id -> why it is not comparable with the chosen runs."""
    seeds: dict[str, int] = field(default_factory=dict)
    """run id -> its seed (`user_train.seed`)."""

    def settings(self) -> dict[str, tuple[str, ...]]:
        """knob value -> the runs pooled for it, one per seed (in `run_ids` order)."""
        out: dict[str, tuple[str, ...]] = {}
        for run_id in self.run_ids:
            out[self.values[run_id]] = (*out.get(self.values[run_id], ()), run_id)
        return out

    def describe(self) -> str:
        parts = []
        for value, run_ids in self.settings().items():
            names = ", ".join(f"`{r}`" for r in run_ids)
            seeds = f", seeds {', '.join(str(self.seeds.get(r, 0)) for r in run_ids)}" if len(run_ids) > 1 else ""
            parts.append(f"{names} ({value}{seeds})")
        text = f"Runs used: {', '.join(parts) or 'none'}."
        if self.excluded:
            text += f" Left out {len(self.excluded)}: " + "; ".join(f"`{r}` {why}" for r, why in
                                                                    list(self.excluded.items())[:5])
            text += " …" if len(self.excluded) > 5 else ""
        return text


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys (`oppu.runs.flatten`) with each value as canonical JSON, so lists and None compare as values."""
    from oppu.runs import flatten

    return {key: json.dumps(value, sort_keys=True, default=str) for key, value in flatten(config, prefix).items()}


@dataclass(frozen=True)
class _Candidate:
    """One finished run as `comparable_runs` weighs it."""

    run_id: str
    value: str
    replicates: str
    """What its seeds pool under: the run's `seed_group`, or the run itself when it has none."""
    seed: int
    stamp: float


def comparable_runs(kind: str, runs: Iterable[Mapping[str, Any]]) -> Comparison:
    """The finished runs (each a mapping with run_id, config (dict or JSON), data_fingerprint, model, status,
    created) that differ in the swept knob alone: same users, data, model and every other setting. The seed keys
    (`oppu.replicates.VARIED`) are not a setting: a knob value takes the newest of its replicate sets (the runs
    of one `seed_group`, or a lone run), every seed of it pooled. Of the groups of runs that agree on all the
    rest, the one covering the most knob values wins (then the newest); with `activity` (nothing swept) the
    newest replicate set alone. Pure."""
    if kind not in KNOBS:
        raise ValueError(f"unknown sweep {kind!r}: use one of {', '.join(KNOBS)}")
    knobs = KNOBS[kind]
    groups: dict[str, list[_Candidate]] = {}
    signature_of: dict[str, dict[str, Any]] = {}
    excluded: dict[str, str] = {}
    for run in runs:
        run_id = str(run["run_id"])
        if run.get("status") not in (None, "done"):
            excluded[run_id] = f"is {run.get('status')}"
            continue
        config = run.get("config") or {}
        config = json.loads(config) if isinstance(config, str) else dict(config)
        flat = _flat(config)
        rest = {k: v for k, v in flat.items() if k not in knobs and k not in VARIED and not k.startswith(FREE_KEYS)}
        rest["data_fingerprint"] = str(run.get("data_fingerprint") or "")
        rest["model"] = str(run.get("model") or "")
        signature = json.dumps(rest, sort_keys=True)
        value = ", ".join(f"{k.split('.')[-1]}={json.loads(flat.get(k, 'null'))}" for k in knobs) or "all users"
        created = run.get("created")
        stamp = created.timestamp() if hasattr(created, "timestamp") else float(created or 0)
        seed = json.loads(flat.get("user_train.seed", "0")) or 0  # TrainConfig.seed's default when unrecorded
        group = config.get("seed_group") or f"run:{run_id}"
        groups.setdefault(signature, []).append(_Candidate(run_id, value, group, int(seed), stamp))
        signature_of[signature] = rest
    if not groups:
        return Comparison(kind, (), {}, excluded)

    def rank(item):
        members = item[1]
        return (len({m.value for m in members}) if knobs else 1, max(m.stamp for m in members))

    best, members = max(groups.items(), key=rank)
    newest_set: dict[str, tuple[str, float]] = {}  # knob value -> (replicate set, its newest run's stamp)
    for m in members:
        if m.value not in newest_set or m.stamp > newest_set[m.value][1]:
            newest_set[m.value] = (m.replicates, m.stamp)
    chosen: dict[str, _Candidate] = {}
    for m in sorted(members, key=lambda m: -m.stamp):
        if m.replicates != newest_set[m.value][0]:
            excluded[m.run_id] = (f"repeats {m.value} (the newest run or seed group of a setting is used)" if knobs
                                  else "is an older run of the same setting")
        elif any(c.value == m.value and c.seed == m.seed for c in chosen.values()):
            excluded[m.run_id] = f"repeats seed {m.seed} of {m.value} (the newest run of a seed is used)"
        else:
            chosen[m.run_id] = m
    for signature, others in groups.items():
        if signature == best:
            continue
        differs = sorted(k for k in set(signature_of[signature]) | set(signature_of[best])
                         if signature_of[signature].get(k) != signature_of[best].get(k))
        for m in others:
            excluded[m.run_id] = f"differs in {', '.join(differs[:3])}" + (" …" if len(differs) > 3 else "")
    order = sorted(chosen, key=lambda r: (chosen[r].value, chosen[r].seed))
    return Comparison(kind, tuple(order), {r: chosen[r].value for r in order}, excluded,
                      {r: chosen[r].seed for r in order})


def activity_bins(sizes: Sequence[int], bins: int = 4) -> list[tuple[int, int]]:
    """Up to `bins` contiguous ranges of history sizes holding about equally many users, never splitting one
    size over two bins (so no two bins share a label; fewer bins when there are fewer distinct sizes)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1 (got {bins})")
    ordered = sorted(int(s) for s in sizes)
    distinct = sorted(set(ordered))
    if not distinct:
        return []
    out: list[tuple[int, int]] = []
    start, taken = 0, 0
    for b in range(bins):
        if start >= len(distinct):
            break
        target = len(ordered) * (b + 1) / bins
        end = start
        count = taken + ordered.count(distinct[end])
        # grow the bin while the next size brings the count closer to its share (and leaves sizes for the rest)
        while end + 1 < len(distinct) and len(distinct) - (end + 1) > bins - b - 2 >= 0 and \
                abs(count + ordered.count(distinct[end + 1]) - target) <= abs(count - target):
            end += 1
            count += ordered.count(distinct[end])
        if b == bins - 1:
            end = len(distinct) - 1
        out.append((distinct[start], distinct[end]))
        taken = sum(ordered.count(d) for d in distinct[: end + 1])
        start = end + 1
    return out


def bin_label(low: int, high: int) -> str:
    return f"{low} items" if low == high else f"{low}–{high} items"


def comparable_frame(kind: str, cells: Any, comparison: Comparison, bins: int = 4) -> Any:
    """The analysis table of `kind` over the comparison's runs only, from `Store.analysis_cells` rows, with the
    columns the store's own analysis queries return (plus `bin_label` for activity). The seeds of a setting pool
    into its rows (`runs` counts them); activity bins count each user once."""
    import pandas as pd

    from oppu.config import METHODS

    frame = cells[cells["run_id"].isin(comparison.run_ids)] if len(cells) else cells
    if frame.empty:
        return pd.DataFrame()
    frame = frame.copy()
    frame["history_cutoff"] = frame["history_cutoff"].fillna("").astype(str)
    if kind == "activity":
        per_user = frame.groupby("user_id")["history_size"].max()  # once per user, however many seeds answered
        ranges = activity_bins(per_user.tolist(), bins)

        def which(size: int) -> int:
            return next(i for i, (lo, hi) in enumerate(ranges, start=1) if lo <= size <= hi)

        frame["bin"] = frame["history_size"].astype(int).map(which)
        out = frame.groupby(["bin", "method"]).agg(s=("s", "sum"), n=("n", "sum"),
                                                    users=("user_id", "nunique")).reset_index()
        out["history_min"] = out["bin"].map(lambda b: ranges[b - 1][0])
        out["history_max"] = out["bin"].map(lambda b: ranges[b - 1][1])
        out["bin_label"] = [bin_label(lo, hi) for lo, hi in zip(out["history_min"], out["history_max"])]
        out["score"] = out["s"] / out["n"]
        return out[["bin", "history_min", "history_max", "bin_label", "method", "score", "users", "n"]]
    column = {"k": "k", "peft": "peft", "history-format": "history_format", "behaviour-shift": "history_cutoff"}[kind]
    if kind == "k":
        frame = frame[frame["method"].map(lambda m: METHODS[m].retrieval if m in METHODS else False)]
    if kind == "peft":
        frame = frame[frame["method"].map(lambda m: METHODS[m].adapter if m in METHODS else False)]
    out = frame.groupby([column, "method"]).agg(s=("s", "sum"), n=("n", "sum"),
                                                 runs=("run_id", "nunique")).reset_index()
    out["score"] = out["s"] / out["n"]
    if kind == "k":
        out["personal"] = out["method"].map(lambda m: METHODS[m].adapter if m in METHODS else False)
        return out[["method", "personal", "k", "score", "n", "runs"]]
    return out[[column, "method", "score", "n", "runs"]]
