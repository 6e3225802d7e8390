"""How sure a stored number is: per-method intervals and paired differences of one run or a seed group, as
`oppu results`, the dashboard and `oppu report` show them.

Built on `oppu.stats` (cluster bootstrap over users, and seeds when several; sign-flip permutation p; query
wins/ties/losses). The per-query score is the stored row score under a scoring: 1/0 for a label, the absolute
error for a rating (lower is better), ROUGE-L for text, so a method's mean is the LaMP run score.
"""

from __future__ import annotations

from typing import Any

N_BOOT = 2000


def methods_in_order(methods) -> list[str]:
    """The paper's rows in their table order, then anything else alphabetically."""
    from oppu.config import METHODS

    rank = {m: i for i, m in enumerate(METHODS)}
    return sorted(set(methods), key=lambda m: (rank.get(m, len(rank)), m))


def uncertainty(store, run_ids: list[str], scoring: str = "official", reference: str | None = None,
                n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Intervals and paired comparisons of the runs' methods (one run, or the seeds of one group), from every
    scored prediction: `oppu.stats.compare_methods`' result plus task, metric, runs and seeds.

    The per-query score is the official (or lenient) row score: 1/0 for a label, the absolute error for a
    rating (lower is better), ROUGE-L for text. ValueError when the runs have no scored predictions, span
    several tasks or lack the reference method."""
    from oppu.metrics import check_scoring

    check_scoring(scoring)
    scores = store.scores(run_ids, scoring)
    if scores.empty:
        raise ValueError(f"no scored predictions in run(s) {', '.join(run_ids)} yet")
    return summarize(scores, scoring, reference, n_boot, seed)


def summarize(scores, scoring: str = "official", reference: str | None = None, n_boot: int = N_BOOT,
              seed: int = 0) -> dict:
    """`uncertainty` on a `Store.scores` frame (columns task, run_id, seed, user_id, query_id, method, score)."""
    from oppu.config import method_label
    from oppu.metrics import row_score_name
    from oppu.stats import compare_methods

    if scores.empty:
        raise ValueError("no scored predictions")
    tasks = sorted(set(scores["task"]))
    if len(tasks) > 1:
        raise ValueError(f"the runs span tasks {', '.join(tasks)}: compare runs of one task")
    metric, lower = row_score_name(tasks[0], scoring)
    methods = methods_in_order(scores["method"])
    reference = reference or ("none" if "none" in methods else methods[0])
    if reference not in methods:
        raise ValueError(f"reference method {reference!r} is not in the run(s): use one of {', '.join(methods)}")
    result = compare_methods(scores, reference, n_boot=n_boot, seed=seed, higher_is_better=not lower,
                             methods=methods)
    order = {m: i for i, m in enumerate(methods)}
    result["summary"].sort(key=lambda r: order[r["method"]])
    for row in result["summary"]:
        row["label"] = method_label(row["method"])
    for d in result["differences"]:
        d["label_a"], d["label_b"] = method_label(d["method_a"]), method_label(d["method_b"])
    seeds = sorted(int(s) for s in set(scores["seed"]))
    result.update(task=tasks[0], scoring=scoring, metric=metric, lower_is_better=lower,
                  runs=sorted(set(scores["run_id"])), seeds=seeds)
    return result


def format_p(p: float) -> str:
    """A p-value as `oppu.stats.format_difference` writes it."""
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def format_lines(result: dict) -> list[str]:
    """The lines `oppu results --run/--group` prints for an `uncertainty` result."""
    from oppu.config import method_label

    pct = f"{result['settings']['ci']:.0%}"
    direction = "lower" if result["lower_is_better"] else "higher"
    seeds = result["seeds"]
    lines = [f"{result['task']} · {result['metric']} per query ({direction} is better) · {len(result['runs'])} "
             f"run(s), seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"]
    width = max(18, *(len(r["label"]) + 2 for r in result["summary"]))
    lines.append("  " + "method".ljust(width) + f"{'mean':>8}  {pct + ' CI':<18}{'users':>6}{'queries':>9}"
                 f"{'seeds':>7}")
    for r in result["summary"]:
        lines.append("  " + r["label"].ljust(width) + f"{r['mean']:8.3f}  "
                     + f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]".ljust(18)
                     + f"{r['n_users']:6d}{r['n_queries']:9d}{r['n_seeds']:7d}")
    ref = method_label(result["settings"]["reference"])
    if result["differences"]:
        lines.append(f"  difference from {ref} (paired on shared queries):")
    for d in result["differences"]:
        lines.append("  " + d["label_a"].ljust(width) + f"{d['diff']:+8.3f}  "
                     + f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]".ljust(18)
                     + f"{format_p(d['p_value']):>9}  wins/ties/losses {d['wins']}/{d['ties']}/{d['losses']}")
    s = result["settings"]
    lines.append(f"  ({pct} percentile intervals, {s['n_boot']} bootstrap resamples of users"
                 + (" and seeds" if len(seeds) > 1 else "") + "; p: two-sided sign-flip permutation test over "
                 "users; wins/ties/losses count queries" + (" x seeds" if len(seeds) > 1 else "") + ")")
    return lines


def uncertainty_lines(store, run_ids: list[str], scoring: str = "official", reference: str | None = None,
                      n_boot: int = N_BOOT) -> list[str]:
    """`format_lines(uncertainty(...))`, or one line saying why there is nothing to show."""
    try:
        return format_lines(uncertainty(store, run_ids, scoring, reference, n_boot))
    except ValueError as exc:
        return [f"(no intervals: {exc})"]


def difference_line(d: dict[str, Any]) -> str:
    """"OPPU vs RAG: +0.083 [-0.021, +0.190], p=0.31" for one `paired_difference` (labels when present)."""
    a, b = d.get("label_a", d["method_a"]), d.get("label_b", d["method_b"])
    return f"{a} vs {b}: {d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], {format_p(d['p_value'])}"


def grouped_intervals(scores, by: str, higher_is_better: bool = True, n_boot: int = N_BOOT, seed: int = 0,
                      replicate: str = "run_id"):
    """Per (`by`, method): mean, ci_low, ci_high, n_users, n_queries, n_seeds of a `Store.analysis_scores` frame.

    `replicate` names the column resampled beside users: every run is a replicate of its setting by default, so
    runs that repeat a setting (seeds, or the same sweep run twice) widen the interval instead of colliding."""
    import pandas as pd

    from oppu.stats import method_summary

    columns = [by, "method", "mean", "ci_low", "ci_high", "n_users", "n_queries", "n_seeds"]
    if scores.empty:
        return pd.DataFrame(columns=columns)
    parts = []
    for value, group in scores.groupby(by, sort=True, dropna=False):
        frame = group.assign(seed=group[replicate])[["user_id", "query_id", "method", "seed", "score"]]
        summary = method_summary(frame, n_boot, seed)
        parts.append(summary.assign(**{by: value}))
    return pd.concat(parts, ignore_index=True)[columns]
