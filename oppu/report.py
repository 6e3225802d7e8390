"""`oppu report`: the paper's main table and analyses, run into the results store and written as one HTML file.

Layers: plan (a report preset -> the runs of every section, each a `RunConfig` built by `build_config`) -> execute
(each run with `run_experiment`, or once per seed with `oppu.replicates.run_seeds`; a run whose config equals an
earlier one's up to its methods and tag is not run again, its stored answers are reused) -> gather (per-query
scores and per-user cells from the store, intervals from `oppu.uncertainty`) -> render (one self-contained HTML
file: plotly.js inlined once, every figure an inline div, tables with 95% intervals, the command, the config and
the run ids behind every number, the machine and the wall time).

Sections: the main table (every paper row on each of the seven tasks), Fig. 3 (performance by user activity on
LaMP_2M and LaMP_7), Fig. 4 (retrieved items k: OPPU+RAG against RAG), behaviour shift, history format and PEFT
type. Tasks without a data folder are listed as skipped, never silently dropped.

Nothing is tuned on test queries. By default every setting is the report preset's, fixed before any query is
answered; with `run_preset` a tuned preset file (`oppu tune`, chosen on a validation split of each test user's most
recent history items), and the report names the split and what it chose (`tuning_statement`).
"""

from __future__ import annotations

import html
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oppu.config import PAPER_METHODS, RunConfig, build_config, method_label
from oppu.errors import OppuError

ALL_TASKS = ("LaMP_1", "LaMP_2N", "LaMP_2M", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7")
SECTIONS: dict[str, str] = {
    "main": "Main table: every method on every task",
    "activity": "Fig. 3: performance by user activity",
    "k": "Fig. 4: number of retrieved items k",
    "behaviour-shift": "Behaviour shift",
    "history-format": "History format",
    "peft": "PEFT type",
}
"""Section id -> heading, in report order (each id is also the HTML anchor of its section)."""
TUNING_STATEMENT = ("Nothing was tuned: every setting is the report preset's, fixed before any query was answered; "
                    "no choice was made on test queries (nor on a validation split, as none was needed).")


def tuning_statement(run_preset: str | None) -> str:
    """What was chosen, on which split and how: TUNING_STATEMENT unless the run preset was written by `oppu tune`."""
    from oppu.config import preset_chosen_on

    chosen = preset_chosen_on(run_preset) if run_preset else None
    if not chosen:
        return TUNING_STATEMENT
    values = ", ".join(f"{k}={v}" for k, v in chosen["chosen"].items())
    return (f"{values} chosen on the validation split of {chosen['task']} ({len(chosen['users'])} users, each "
            f"user's {chosen['validation_items']} most recent history items held out of training and answered; "
            f"objective: {chosen['objective']}) by `{chosen['command']}`; every other setting is the run "
            "preset's. No choice was made on test queries.")


@dataclass(frozen=True)
class ReportPreset:
    """How big a report is: the run preset under it, overrides of its sizes, the seeds and each analysis' scope."""

    about: str
    run_preset: str | None = None
    """An `oppu/presets` name the runs start from (None: `RunConfig()`'s defaults)."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """Dotted `build_config` overrides on top of the run preset (users, training sizes)."""
    seeds: tuple[int, ...] = (0,)
    """One run per seed of every configuration (more than one: intervals over users and seeds)."""
    tasks: tuple[str, ...] = ALL_TASKS
    activity_tasks: tuple[str, ...] = ("LaMP_2M", "LaMP_7")
    activity_users: int = 12
    activity_methods: tuple[str, ...] = ("none", "rag", "oppu", "oppu+rag")
    analysis_task: str = "LaMP_2M"
    """The task of the k, behaviour-shift, history-format and PEFT analyses."""
    analysis_users: int | None = None
    """Users of those four analyses (None: the main table's)."""
    analysis_seeds: tuple[int, ...] | None = None
    """Seeds of those four analyses (None: `seeds`); the main table and Fig. 3 always run every seed."""
    k_values: tuple[int, ...] = (0, 1, 2, 4)
    peft_kinds: tuple[str, ...] = ("lora", "ia3", "prompt")
    shift_cutoffs: tuple[str, ...] | None = None
    """History cutoff dates of the behaviour-shift analysis (None: quantiles of the users' history dates)."""


REPORT_PRESETS: dict[str, ReportPreset] = {
    "tiny": ReportPreset(
        "For tests: two users per task, one short epoch, a few-step task adaptation and three-token answers.",
        overrides={"users": 2, "user_train.epochs": 1, "user_train.batch_size": 4, "user_train.max_length": 128,
                   "user_train.max_examples": 4, "adaptation_train.max_examples": 8,
                   "adaptation_train.max_length": 128, "generation.max_new_tokens": 3},
        activity_users=3, activity_methods=("none", "oppu"), k_values=(0, 1, 2)),
    "demo": ReportPreset(
        "Sized for a 2-core CPU within 90 minutes, on the demo data: the `quick` run preset (its per-user lr chosen "
        "on a validation split), the main table on LaMP_2M, LaMP_3 and LaMP_7 with the 12 most active users and "
        "three seeds, Fig. 3 on those same runs, and the k, behaviour-shift (at the demo data's shift date "
        "2021-07-01), history-format and PEFT analyses on LaMP_2M with 4 users and one seed.",
        run_preset="quick", overrides={"users": 12}, seeds=(0, 1, 2),
        tasks=("LaMP_2M", "LaMP_3", "LaMP_7"), activity_users=12, analysis_users=4, analysis_seeds=(0,),
        k_values=(0, 1, 2, 4), shift_cutoffs=("2021-07-01",)),
    "paper": ReportPreset(
        "The official protocol (`paper` run preset: 100 users, the paper's schedules and decoding), three seeds; "
        "meant for a GPU and a 7B model.", run_preset="paper", seeds=(0, 1, 2), activity_users=100,
        k_values=(0, 1, 2, 4, 8)),
}


class ReportError(OppuError, ValueError):
    """The report cannot be planned as asked; the message says what to change."""


# -- plan --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    section: str
    task: str
    label: str
    """What this run varies within its section (e.g. `k=2`, `ia3`), or the task for the main table."""
    cfg: RunConfig
    seeds: tuple[int, ...] = ()
    """The seeds this run is made with; empty: the report's seeds."""


def get_preset(name: str) -> ReportPreset:
    if name not in REPORT_PRESETS:
        raise ReportError(f"unknown report preset {name!r}: use one of {', '.join(REPORT_PRESETS)}")
    return REPORT_PRESETS[name]


def customized(preset: ReportPreset, seeds: Sequence[int] | str | None = None,
               run_preset: str | None = None) -> ReportPreset:
    """`preset` with its seeds and/or run preset replaced (the CLI's --seeds and --run-preset)."""
    import dataclasses

    from oppu.config import load_preset

    if seeds is not None:
        from oppu.replicates import parse_seeds

        preset = dataclasses.replace(preset, seeds=tuple(parse_seeds(seeds)))
    if run_preset is not None:
        load_preset(run_preset)  # an unknown name or unreadable file fails here, before planning
        preset = dataclasses.replace(preset, run_preset=run_preset)
    return preset


def plan(preset: ReportPreset, overrides: Mapping[str, Any] | None = None) -> tuple[list[PlannedRun], list[str]]:
    """Every run of the report and the notes on what was skipped (tasks without data, analyses without dates)."""
    from oppu.analyses import sweep_configs

    layer = {**preset.overrides, **(overrides or {})}
    data_dir = Path(build_config(preset.run_preset, layer).data_dir)
    notes: list[str] = []

    def available(task: str, what: str) -> bool:
        if (data_dir / task).is_dir():
            return True
        notes.append(f"{what}: skipped {task}, no data folder {data_dir / task}")
        return False

    def base(task: str, section: str, methods: Sequence[str]) -> RunConfig:
        return build_config(preset.run_preset, {**layer, "task": task, "methods": list(methods),
                                                "tag": f"report:{section}"})

    def analysis_base(task: str, section: str, methods: Sequence[str]) -> RunConfig:
        cfg = base(task, section, methods)
        return cfg if preset.analysis_users is None else cfg.replace(users=preset.analysis_users, user_ids=None)

    runs: list[PlannedRun] = []
    for task in preset.tasks:
        if available(task, SECTIONS["main"]):
            runs.append(PlannedRun("main", task, task, base(task, "main", PAPER_METHODS)))
    for task in preset.activity_tasks:
        if available(task, SECTIONS["activity"]):
            cfg = base(task, "activity", preset.activity_methods).replace(users=preset.activity_users, user_ids=None)
            runs.append(PlannedRun("activity", task, f"{preset.activity_users} users", cfg))
    task = preset.analysis_task
    if available(task, "the analyses"):
        shift = list(preset.shift_cutoffs) if preset.shift_cutoffs else None
        sweeps = (("k", ("rag", "oppu+rag"), list(preset.k_values), lambda c: f"k={c.retrieval.k}"),
                  ("behaviour-shift", ("none", "oppu", "oppu+rag"), shift,
                   lambda c: f"before {c.history_cutoff}" if c.history_cutoff else "full history"),
                  ("history-format", ("rag", "oppu+rag"), None, lambda c: c.history_format),
                  ("peft", ("oppu",), list(preset.peft_kinds), lambda c: c.user_peft.kind))
        for section, methods, values, label in sweeps:
            try:
                configs = sweep_configs(section, analysis_base(task, section, methods), values)
            except ValueError as exc:  # e.g. behaviour shift over undated data
                notes.append(f"{SECTIONS[section]}: skipped ({exc})")
                continue
            runs += [PlannedRun(section, task, label(c), c.replace(tag=f"report:{section}"),
                                tuple(preset.analysis_seeds or ())) for c in configs]
    return runs, notes


def _reuse_key(run: PlannedRun, seeds: Sequence[int]) -> str:
    """Runs whose configs are equal but for their methods and tag, made with the same seeds, answer the same way:
    one run can serve both."""
    seeds = run.seeds or tuple(seeds)
    return json.dumps([list(seeds), run.cfg.replace(methods=("none",), tag="", seed_group="").to_json()])


# -- execute -----------------------------------------------------------------------------------------------------
@dataclass
class ExecutedRun:
    planned: PlannedRun
    run_ids: list[str]
    seconds: float
    reused: str | None = None
    """The section/label of the earlier run whose answers this one reuses; None when it ran itself."""


class ReportProgress:
    """One bar over every user of every run still to run (all seeds), with the time left; stages as postfix."""

    def __init__(self, total_users: int, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.offset = 0
        """Users of the runs finished before the current one."""
        self.seed_base = 0
        """Users of the current run's earlier seeds (`run_seeds` reports each seed's users from 0 again)."""
        self.current = 0
        self.last_total = 0
        self.what = ""
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_users, unit="user", file=sys.stderr, dynamic_ncols=True,
                            desc="report", bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                                      "users [{elapsed}<{remaining}] {postfix}")

    def write(self, line: str) -> None:
        """A line above the bar (or plain, without one)."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def start(self, what: str) -> None:
        self.what = what
        if self.bar is not None:
            self.bar.set_postfix_str(what)

    def __call__(self, stage: str, step: int, total: int, loss: float | None) -> None:
        if stage == "users":
            if step < self.current:  # the next seed's run of the same config began
                self.seed_base += self.last_total
            self.current, self.last_total = step, total
            if self.bar is not None:
                self.bar.n = self.offset + self.seed_base + step
                self.bar.refresh()
        elif self.bar is not None:
            self.bar.set_postfix_str(f"{self.what} · {stage} {step}/{total}")

    def finish_run(self, users: int) -> None:
        self.offset += users
        self.seed_base = self.current = self.last_total = 0
        if self.bar is not None:
            self.bar.n = self.offset
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_FREE = ("tag", "seed_group", "methods", "db", "artifacts_dir", "data_dir")
"""Config keys a stored run may differ in and still give a planned run its answers (the data is compared by its
fingerprint, the methods as a superset)."""


def _answer_key(config: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in _FREE}, sort_keys=True, default=str)


FINISHED_EARLIER = "finished earlier"
"""`ExecutedRun.reused` of a run whose answers a store held before this report started."""


class FinishedRuns:
    """The finished runs of a store, by their config up to names and paths (`_answer_key`), read once: a report
    run again after a kill, or to re-render, redoes only what it has not finished."""

    def __init__(self, store):
        runs = store.runs()  # newest first: the newest of equal runs is the one found
        self.by_key: dict[str, list[tuple[set[str], Any]]] = {}
        for row in runs[runs["status"] == "done"].itertuples():
            config = json.loads(row.config)
            self.by_key.setdefault(_answer_key(config), []).append((set(config.get("methods", ())), row))
        self.fingerprints: dict[tuple[str, str], str] = {}

    def _fingerprint(self, data_dir: str, task: str) -> str:
        from oppu.data import load_task_data

        if (data_dir, task) not in self.fingerprints:
            self.fingerprints[(data_dir, task)] = load_task_data(data_dir, task).fingerprint
        return self.fingerprints[(data_dir, task)]

    def answers(self, run: PlannedRun, seeds: Sequence[int]) -> tuple[list[str], float] | None:
        """Run ids (one per seed, in seed order) of finished runs that answered exactly this planned run: the
        same config up to names and paths, every planned method, the same data; with the seconds they took
        (created to finished). None when any seed is missing."""
        from oppu.experiment import portable_config

        if not self.by_key:
            return None
        found, seconds = [], 0.0
        for seed in run.seeds or tuple(seeds):
            candidates = self.by_key.get(_answer_key(portable_config(_seeded(run.cfg, seed))), ())
            match = next((row for methods, row in candidates
                          if set(run.cfg.methods) <= methods and row.task == run.task
                          and row.data_fingerprint == self._fingerprint(run.cfg.data_dir, run.task)), None)
            if match is None:
                return None
            found.append(match.run_id)
            seconds += max((match.finished - match.created).total_seconds(), 0.0)
        return found, seconds


def execute(runs: Sequence[PlannedRun], seeds: Sequence[int], progress: ReportProgress | None = None,
            log: Callable[[str], None] = lambda line: None, store=None) -> list[ExecutedRun]:
    """Run every planned run (once per seed), reusing an earlier run of the same config, of this report or
    finished in `store` before (`FinishedRuns`); in plan order."""
    from oppu.experiment import run_experiment
    from oppu.replicates import run_seeds

    finished_runs = FinishedRuns(store) if store is not None else None

    done: dict[str, list[tuple[set[str], ExecutedRun]]] = {}
    out = []
    for i, run in enumerate(runs, 1):
        key, run_seeds_ = _reuse_key(run, seeds), run.seeds or tuple(seeds)
        earlier = next((e for e in done.get(key, ()) if set(run.cfg.methods) <= e[0]), None)
        what = f"[{i}/{len(runs)}] {run.section} {run.task} {run.label}"
        if earlier is not None:
            source = earlier[1]
            log(f"{what}: reuses the answers of {source.planned.section} {source.planned.label}")
            out.append(ExecutedRun(run, source.run_ids, 0.0, f"{source.planned.section} {source.planned.label}"))
            if progress is not None:
                progress.finish_run(0)
            continue
        finished = finished_runs.answers(run, seeds) if finished_runs is not None else None
        if finished is not None:
            ids, seconds = finished
            log(f"{what}: already in the store ({', '.join(ids)})")
            executed = ExecutedRun(run, ids, seconds, FINISHED_EARLIER)
            if progress is not None:
                progress.finish_run(expected_users(run.cfg) * len(run_seeds_))
            done.setdefault(key, []).append((set(run.cfg.methods), executed))
            out.append(executed)
            continue
        log(f"{what}: {', '.join(run.cfg.methods)}")
        if progress is not None:
            progress.start(what)
        start = time.perf_counter()
        if len(run_seeds_) > 1:
            _, run_ids = run_seeds(run.cfg, run_seeds_, progress=progress)
        else:
            seed = run_seeds_[0]
            cfg = run.cfg if seed == run.cfg.user_train.seed else _seeded(run.cfg, seed)
            run_ids = [run_experiment(cfg, progress=progress)]
        executed = ExecutedRun(run, run_ids, time.perf_counter() - start)
        if progress is not None:
            progress.finish_run(expected_users(run.cfg) * len(run_seeds_))
        done.setdefault(key, []).append((set(run.cfg.methods), executed))
        out.append(executed)
    return out


def _seeded(cfg: RunConfig, seed: int) -> RunConfig:
    from oppu.replicates import with_seed

    return with_seed(cfg, seed, cfg.seed_group)


def expected_users(cfg: RunConfig) -> int:
    return len(cfg.user_ids) if cfg.user_ids else int(cfg.users or 1)


def runs_of_their_own(runs: Sequence[PlannedRun], seeds: Sequence[int]) -> list[PlannedRun]:
    """The planned runs that `execute` runs itself: not those an earlier run of the same config (`_reuse_key`)
    that answered all their methods serves."""
    seen: dict[str, list[set[str]]] = {}
    out = []
    for run in runs:
        key = _reuse_key(run, seeds)
        if any(set(run.cfg.methods) <= methods for methods in seen.get(key, ())):
            continue
        seen.setdefault(key, []).append(set(run.cfg.methods))
        out.append(run)
    return out


def users_to_run(runs: Sequence[PlannedRun], seeds: Sequence[int]) -> int:
    """Users the report trains and answers (reused runs not counted): the progress bar's total."""
    return sum(expected_users(run.cfg) * len(run.seeds or seeds) for run in runs_of_their_own(runs, seeds))


def estimate(runs: Sequence[PlannedRun], seeds: Sequence[int], unit_s: Mapping[str, float] | None = None
             ) -> dict[str, Any]:
    """What the report will compute, in `oppu.jobs.plan` units (task-adaptation steps, per-user training steps,
    answered rows) and seconds at `unit_s` per unit (default `oppu.jobs.plan.DEFAULT_UNIT_S`). A task adaptation
    is counted once per task, style and settings (its cache serves every later run and seed); runs reused from
    another section are not counted."""
    from oppu.data import load_task_data
    from oppu.jobs.plan import estimate_s, plan_run, plan_units

    data: dict[tuple[str, str], Any] = {}
    adapted: set[str] = set()
    stages = []
    for run in runs_of_their_own(runs, seeds):
        where = (run.cfg.data_dir, run.task)
        if where not in data:
            data[where] = load_task_data(*where)
        for stage in plan_run(run.cfg, data[where]):
            if stage.kind == "adapt":
                cache = f"{stage.key}|{json.dumps(dataclass_dict(run.cfg.adaptation_train), sort_keys=True)}"
                if cache in adapted:
                    continue
                adapted.add(cache)
                stages.append(stage)
            else:
                stages += [stage] * len(run.seeds or seeds)
    return {"units": plan_units(stages), "seconds": estimate_s(stages, unit_s)}


def dataclass_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


# -- gather ------------------------------------------------------------------------------------------------------
def _cells(store, executed: Sequence[ExecutedRun]):
    """Per-user score cells of the executed runs, each row tagged with its run's section and label."""
    import pandas as pd

    parts = []
    for run in executed:
        cells = store.analysis_cells(run.planned.task)
        cells = cells[cells["run_id"].isin(run.run_ids) & cells["method"].isin(run.planned.cfg.methods)]
        parts.append(cells.assign(section=run.planned.section, label=run.planned.label, task=run.planned.task))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def main_table(store, executed: Sequence[ExecutedRun]) -> list[dict[str, Any]]:
    """Per task of the main section: `oppu.uncertainty.summarize` (methods vs the non-personalized row), the key
    differences, and the official LaMP metrics averaged over seeds."""
    import pandas as pd

    from oppu.uncertainty import key_differences, summarize

    out = []
    for run in (r for r in executed if r.planned.section == "main"):
        scores = store.scores(run.run_ids)
        scores = scores[scores["method"].isin(run.planned.cfg.methods)]
        if scores.empty:
            out.append({"task": run.planned.task, "run": run, "result": None})
            continue
        result = summarize(scores)
        metrics = pd.concat([store.run_metrics(r) for r in run.run_ids], ignore_index=True)
        lamp = metrics.groupby(["method", "metric"], as_index=False)["value"].mean()
        out.append({"task": run.planned.task, "run": run, "result": result, "lamp": lamp,
                    "key": key_differences(scores, not result["lower_is_better"]),
                    "spread": store.answer_spread(run.run_ids).set_index("method")})
    return out


CLAIMS = (("oppu", "none"), ("oppu+rag", "rag"), ("oppu+pag", "pag"))
"""The paper's claims a report checks on every task: each OPPU variant beats its twin without the personal
adapter. A claim holds when the 95% interval of the paired difference lies wholly on the better side of zero."""
REPORTED = (("oppu", "rag"),)
"""Comparisons reported whatever they show (the paper also finds OPPU alone ahead of RAG)."""


def findings(tables: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per main-table task, each pair of CLAIMS and REPORTED with its paired difference and a verdict:
    `holds`/`not shown` for a claim, `better`/`worse`/`no difference shown` for a reported pair."""
    out = []
    for t in tables:
        if t.get("result") is None:
            continue
        higher = not t["result"]["lower_is_better"]
        by_pair = {(d["method_a"], d["method_b"]): d for d in t["key"]}
        for kind, pairs in (("claim", CLAIMS), ("reported", REPORTED)):
            for pair in pairs:
                d = by_pair.get(pair)
                if d is None:
                    continue
                better = d["ci_low"] > 0 if higher else d["ci_high"] < 0
                worse = d["ci_high"] < 0 if higher else d["ci_low"] > 0
                if kind == "claim":
                    verdict = "holds" if better else "not shown"
                else:
                    verdict = "better" if better else "worse" if worse else "no difference shown"
                out.append({"task": t["task"], "metric": t["result"]["metric"], "higher_is_better": higher,
                            "kind": kind, "verdict": verdict, **d})
    return out


ANALYSIS_BY = {"activity": "bin", "k": "k", "behaviour-shift": "history_cutoff", "history-format": "history_format",
               "peft": "peft"}
"""Each analysis section's column of `section_frame` (the knob its chart is drawn over)."""


def section_frame(cells, section: str, by: str):
    """The chart frame of one analysis section: per (setting, method) score, interval and counts."""
    from oppu.uncertainty import grouped_intervals, with_activity_bins

    part = cells[cells["section"] == section]
    if part.empty:
        return part
    if by == "bin":
        part = with_activity_bins(part)
        span = part.drop_duplicates("bin")[["bin", "history_min", "history_max"]]
        return grouped_intervals(part, "bin").merge(span, on="bin")
    return grouped_intervals(part, by)


# -- render ------------------------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    """Where the numbers were made."""
    from oppu.precision import cpu_facts

    name, flags = cpu_facts()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    info = {"cpu": f"{name} ({', '.join(shown) or 'no AVX2'})", "cpus": str(os.cpu_count()),
            "host": platform.node(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["accelerator"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
        info["torch threads"] = str(torch.get_num_threads())
    except ImportError:
        pass
    return info


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#212529}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #dee2e6;padding:4px 8px;
text-align:right}th{background:#f1f3f5}td:first-child,th:first-child{text-align:left}code,pre{background:#f8f9fa}
pre{padding:8px;overflow-x:auto;font-size:12px}.note{color:#868e96}section{margin-bottom:3em}"""


def _esc(text: Any) -> str:
    """Text for an HTML text node (quotes stay readable: nothing here goes into an attribute)."""
    return html.escape(str(text), quote=False)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(fig, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config={"responsive": True})


def _spread_cells(t: Mapping[str, Any], method: str) -> list[str]:
    """Distinct answers, and the most common one with its share: a method that answers every query alike has
    learnt the answer's format, not the task."""
    spread = t.get("spread")
    if spread is None or method not in spread.index:
        return ["–", "–"]
    row = spread.loc[method]
    top = str(row["top_answer"])
    top = top if len(top) <= 32 else top[:31] + "…"
    return [f"{int(row['distinct'])} of {int(row['answers'])}", f"{top!r} ({row['top_share']:.0%})"]


SPREAD_HEAD = ["distinct answers", "most common answer (share)"]


def _main_section(tables: list[dict[str, Any]]) -> str:
    from oppu.uncertainty import difference_line, format_p

    parts = [("<p>Mean per-query score with its 95% interval (bootstrap over users, and seeds when several); "
              "below each task, every method against the non-personalized row (paired on shared queries, "
              "sign-flip permutation p, queries won/tied/lost) and the official LaMP metrics.</p>")]
    tasks = [t for t in tables if t["result"] is not None]
    if tasks:
        methods = [m for m in PAPER_METHODS if any(r["method"] == m for t in tasks for r in t["result"]["summary"])]
        header = ["method", *(f"{t['task']} ({t['result']['metric']}, "
                              f"{'lower' if t['result']['lower_is_better'] else 'higher'} better)" for t in tasks)]
        rows = []
        for m in methods:
            cells = []
            for t in tasks:
                r = next((r for r in t["result"]["summary"] if r["method"] == m), None)
                cells.append(f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r else "–")
            rows.append([method_label(m), *cells])
        parts.append(_table(header, rows))
    for t in tables:
        run = t["run"]
        parts.append(f"<h3>{_esc(t['task'])}</h3>")
        if t["result"] is None:
            parts.append("<p class='note'>No scored answers (queries without gold labels?).</p>")
            continue
        res = t["result"]
        parts.append(f"<p>{res['summary'][0]['n_users']} users, {res['summary'][0]['n_queries']} queries, seeds "
                     f"{', '.join(map(str, res['seeds']))}; runs {', '.join(f'<code>{r}</code>' for r in run.run_ids)}"
                     "</p>")
        parts.append(_table(["comparison", "difference", "95% CI", "p", "wins", "ties", "losses"],
                            [[f"{d['label_a']} vs {d['label_b']}", f"{d['diff']:+.3f}",
                              f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]", format_p(d["p_value"]),
                              d["wins"], d["ties"], d["losses"]] for d in res["differences"]]))
        if t["key"]:
            parts.append("<ul>" + "".join(f"<li>{_esc(difference_line(d))}</li>" for d in t["key"]) + "</ul>")
        lamp = t["lamp"]
        if not lamp.empty:
            wide = lamp.pivot(index="method", columns="metric", values="value")
            names = [c for c in wide.columns if not c.startswith("lenient_")]
            parts.append(_table(["method (official LaMP metrics, mean over seeds)", *names, *SPREAD_HEAD],
                                [[method_label(m), *(f"{wide.loc[m, c]:.4f}" for c in names),
                                  *_spread_cells(t, m)] for m in PAPER_METHODS if m in wide.index]))
    return "\n".join(parts)


def _times(executed: Sequence[ExecutedRun], wall_s: float) -> str:
    """The wall time, and the runs' own times when some were finished by an earlier invocation."""
    earlier = [r for r in executed if r.reused == FINISHED_EARLIER]
    if not earlier:
        return f"Wall time {wall_s / 60:.1f} min"
    runs_s = sum(r.seconds for r in executed)
    return (f"Wall time {wall_s / 60:.1f} min of this invocation; {len(earlier)} of the runs had finished in the "
            f"store before it: all runs together took {runs_s / 60:.1f} min")


FINDINGS_HEAD = ["task", "comparison", "difference", "95% CI", "p", "won / tied / lost", "verdict"]


def _finding_row(f: Mapping[str, Any]) -> list[str]:
    from oppu.uncertainty import format_p

    side = "higher" if f["higher_is_better"] else "lower"
    return [f"{f['task']} ({f['metric']}, {side} better)", f"{f['label_a']} vs {f['label_b']}", f"{f['diff']:+.3f}",
            f"[{f['ci_low']:+.3f}, {f['ci_high']:+.3f}]", format_p(f["p_value"]),
            f"{f['wins']} / {f['ties']} / {f['losses']}", f["verdict"]]


def _findings_section(found: Sequence[Mapping[str, Any]]) -> str:
    if not found:
        return "<p class='note'>No main-table task was scored.</p>"
    return ("<p>Each OPPU variant against its twin without the personal adapter (the claim holds when the 95% "
            "interval of the paired difference lies wholly on the better side of zero), and OPPU alone against "
            "RAG, reported whatever it shows.</p>" + _table(FINDINGS_HEAD, [_finding_row(f) for f in found]))


def _setting(row: Mapping[str, Any], by: str) -> str:
    """An analysis table's first cell: the knob's value; an activity bin with the history sizes it spans."""
    if by == "bin":
        return f"{row['bin']} ({row['history_min']}-{row['history_max']} history items)"
    return str(row[by]) if row[by] != "" else "(none)"


def _analysis_section(section: str, cells, metric_of: Callable[[str], tuple[str, bool]]) -> str:
    from dashboard import charts  # the dashboard's pure figure builders, so the report draws the same figures

    by = ANALYSIS_BY[section]
    chart = {"activity": charts.activity_curve, "k": charts.k_sweep, "behaviour-shift": charts.behaviour_shift,
             "history-format": charts.history_format, "peft": charts.peft_comparison}[section]
    part = cells[cells["section"] == section] if not cells.empty else cells
    if part.empty:
        return "<p class='note'>Not run (see the notes above).</p>"
    out = []
    for task in dict.fromkeys(part["task"]):
        frame = section_frame(part[part["task"] == task], section, by)
        metric, lower = metric_of(task)
        fig = chart(frame, metric, lower)
        fig.update_layout(title={"text": f"{fig.layout.title.text} · {task}"})
        out.append(_figure(fig, f"fig-{section}-{task}"))
        shown = frame.rename(columns={"score": "mean"})
        out.append(_table([by, "method", "mean", "95% CI", "users", "queries", "runs"],
                          [[_setting(r, by), method_label(r["method"]), f"{r['mean']:.3f}",
                            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", r["n_users"], r["n_queries"], r["n_runs"]]
                           for _, r in shown.iterrows()]))
    return "\n".join(out)


def render(command: str, preset_name: str, preset: ReportPreset, executed: Sequence[ExecutedRun],
           notes: Sequence[str], tables: list[dict[str, Any]], cells, wall_s: float, db: str) -> str:
    """The whole report as one HTML document (plotly.js inlined once)."""
    from plotly.offline import get_plotlyjs

    from oppu.metrics import row_score_name

    body = [f"<h1>OPPU report · preset <code>{_esc(preset_name)}</code></h1>",
            f"<p>{_esc(preset.about)}</p>",
            "<section id='command'><h2>Command</h2><pre>" + _esc(command) + "</pre>"
            f"<p>Results store <code>{_esc(db)}</code>; every number below can be printed again with "
            f"<code>oppu results --db {_esc(db)} --run RUN_ID</code> (or <code>--group</code>).</p></section>",
            "<section id='tuning'><h2>Tuning</h2><p>" + _esc(tuning_statement(preset.run_preset))
            + "</p></section>",
            "<section id='machine'><h2>Machine and time</h2>"
            + _table(["", ""], [*machine().items(), ("time", _times(executed, wall_s)),
                                ("seeds", ", ".join(map(str, preset.seeds))),
                                ("created", time.strftime("%Y-%m-%d %H:%M:%S %Z"))]) + "</section>"]
    body.append("<section id='findings'><h2>Findings</h2>" + _findings_section(findings(tables)) + "</section>")
    if notes:
        body.append("<section id='notes'><h2>Notes</h2><ul>"
                    + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul></section>")
    for section, title in SECTIONS.items():
        content = (_main_section(tables) if section == "main"
                   else _analysis_section(section, cells, row_score_name))
        body.append(f"<section id='{section}'><h2>{_esc(title)}</h2>{content}</section>")
    body.append("<section id='provenance'><h2>Runs and their configs</h2>"
                + _table(["section", "task", "setting", "run ids", "wall time", "reused"],
                         [[r.planned.section, r.planned.task, r.planned.label, " ".join(r.run_ids),
                           f"{r.seconds:.1f} s", r.reused or ""] for r in executed])
                + "".join(f"<details><summary>{_esc(r.planned.section)} · {_esc(r.planned.task)} · "
                          f"{_esc(r.planned.label)}</summary><pre>"
                          f"{_esc(json.dumps(r.planned.cfg.to_dict(), indent=1, sort_keys=True))}</pre>"
                          "</details>" for r in executed) + "</section>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>OPPU report</title>"
            f"<style>{_CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            + "\n".join(body) + "</body></html>")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def render_markdown(command: str, preset_name: str, preset: ReportPreset, executed: Sequence[ExecutedRun],
                    notes: Sequence[str], tables: list[dict[str, Any]], cells, wall_s: float, db: str,
                    html_name: str) -> str:
    """The report's findings, tables and provenance as Markdown (what docs/RESULTS.md is made of); the figures
    stay in the HTML file."""
    from oppu.metrics import row_score_name

    info = machine()
    data = executed[0].planned.cfg.data_dir if executed else "?"
    lines = [f"# Results: `oppu report --preset {preset_name}`", "",
             (f"Generated by `{command}` on the data in `{data}` (do not edit by hand); the figures are in the "
              f"HTML file it wrote (`{html_name}`). {preset.about}"), "",
             (f"Machine: {info['cpu']}, {info['cpus']} cores, torch {info.get('torch', '?')} with "
              f"{info.get('torch threads', '?')} threads, accelerator {info.get('accelerator', 'none')}. "
              f"{_times(executed, wall_s)}. Seeds {', '.join(map(str, preset.seeds))}. "
              f"Created {time.strftime('%Y-%m-%d %H:%M %Z')}."), "",
             ("Intervals are 95% bootstrap intervals that resample users (their queries with them) and seeds; "
              "paired differences compare two methods on the same queries and seeds, with a user-level sign-flip "
              "permutation p-value."), "", "## Tuning", "", tuning_statement(preset.run_preset), "",
             "## Findings", ""]
    found = findings(tables)
    if found:
        lines += [_md_table(FINDINGS_HEAD, [_finding_row(f) for f in found]), ""]
        claims = [f for f in found if f["kind"] == "claim"]
        for title, holds in (("Claims that hold", True), ("Claims not shown", False)):
            want = [f for f in claims if (f["verdict"] == "holds") == holds]
            if want:
                lines.append(f"{title}: " + "; ".join(f"{f['task']} {f['label_a']} vs {f['label_b']}"
                                                     for f in want) + ".")
        lines.append("")
    else:
        lines += ["No main-table task was scored.", ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    lines += [f"## {SECTIONS['main']}", ""]
    for t in tables:
        lines += [f"### {t['task']}", ""]
        if t["result"] is None:
            lines += ["No scored answers.", ""]
            continue
        res = t["result"]
        lamp = t["lamp"]
        wide = lamp.pivot(index="method", columns="metric", values="value") if not lamp.empty else None
        names = [c for c in wide.columns if not c.startswith("lenient_")] if wide is not None else []
        side = "lower" if res["lower_is_better"] else "higher"
        rows = [[r["label"], f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
                 *(f"{wide.loc[r['method'], c]:.4f}" if wide is not None and r["method"] in wide.index else "–"
                   for c in names), *_spread_cells(t, r["method"])] for r in res["summary"]]
        lines += [_md_table(["method", f"per-query {res['metric']} ({side} is better), mean [95% CI]",
                             *(f"{c} (official, mean over seeds)" for c in names), *SPREAD_HEAD], rows), "",
                  (f"{res['summary'][0]['n_users']} users, {res['summary'][0]['n_queries']} queries, seeds "
                   f"{', '.join(map(str, res['seeds']))}; runs {', '.join(f'`{r}`' for r in t['run'].run_ids)}."),
                  ""]
    for section in (s for s in SECTIONS if s != "main"):
        lines += [f"## {SECTIONS[section]}", ""]
        part = cells[cells["section"] == section] if not cells.empty else cells
        if part.empty:
            lines += ["Not run (see the notes).", ""]
            continue
        by = ANALYSIS_BY[section]
        for task in dict.fromkeys(part["task"]):
            frame = section_frame(part[part["task"] == task], section, by)
            metric, lower = row_score_name(task)
            lines += [f"{task}, per-query {metric} ({'lower' if lower else 'higher'} is better):", "",
                      _md_table([by, "method", "mean [95% CI]", "users", "queries", "runs"],
                                [[_setting(r, by), method_label(r["method"]),
                                  f"{r['score']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", r["n_users"],
                                  r["n_queries"], r["n_runs"]] for _, r in frame.iterrows()]), ""]
    lines += ["## Runs", "", _md_table(["section", "task", "setting", "wall time", "reused", "run ids"],
                                       [[r.planned.section, r.planned.task, r.planned.label, f"{r.seconds:.0f} s",
                                         r.reused or "", " ".join(f"`{i}`" for i in r.run_ids)]
                                        for r in executed]), ""]
    return "\n".join(lines)


# -- the whole report --------------------------------------------------------------------------------------------
def build_report(preset_name: str, out: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None,
                 command: str = "", progress: bool = True, log: Callable[[str], None] = print,
                 seeds: Sequence[int] | None = None, run_preset: str | None = None,
                 markdown: str | os.PathLike[str] | None = None) -> Path:
    """Plan, run every run into the store, gather and write the HTML report; returns its path. `seeds`
    replaces the preset's seeds, `run_preset` its run preset (a name or a tuned preset file); with `markdown`
    the findings, tables and provenance are also written there as Markdown."""
    from oppu.store import Store

    preset = customized(get_preset(preset_name), seeds, run_preset)
    runs, notes = plan(preset, overrides)
    if not runs:
        raise ReportError("nothing to run: no task of the report has a data folder ("
                          + "; ".join(notes) + ")")
    log(f"report {preset_name}: {len(runs)} runs x {len(preset.seeds)} seed(s), "
        f"{users_to_run(runs, preset.seeds)} user trainings")
    log(tuning_statement(preset.run_preset))
    try:
        guess = estimate(runs, preset.seeds)
        log(f"estimate: about {guess['seconds'] / 60:.0f} min at oppu.jobs.plan's untuned default per-unit costs "
            f"({guess['units']['adapt']} adaptation steps, {guess['units']['user']} user steps, "
            f"{guess['units']['generate']} answers); the bar below times the real ones")
    except Exception as exc:  # noqa: BLE001 - an estimate only
        log(f"(no estimate: {exc})")
    for note in notes:
        log(f"note: {note}")
    start = time.perf_counter()
    db = runs[0].cfg.db
    store = Store(db)
    bar = ReportProgress(users_to_run(runs, preset.seeds), enabled=progress)
    try:
        executed = execute(runs, preset.seeds, bar, log=bar.write if progress else log, store=store)
    finally:
        bar.close()
    wall = time.perf_counter() - start
    tables, cells = main_table(store, executed), _cells(store, executed)
    path = Path(out)
    _write(path, render(command, preset_name, preset, executed, notes, tables, cells, wall, db))
    if markdown is not None:
        _write(Path(markdown), render_markdown(command, preset_name, preset, executed, notes, tables, cells, wall,
                                               db, path.name))
    return path


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a killed report never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
