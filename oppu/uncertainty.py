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


def as_replicates(scores):
    """The scores with `seed` as the replicate `oppu.stats` resamples: the run's seed, or the run itself when
    runs repeat a seed (one config run twice is still two replicates)."""
    if "run_id" in scores.columns and scores.duplicated(["user_id", "query_id", "method", "seed"]).any():
        return scores.assign(seed=scores["run_id"])
    return scores


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
    seeds = sorted(int(s) for s in set(scores["seed"]))
    scores = as_replicates(scores)
    result = compare_methods(scores, reference, n_boot=n_boot, seed=seed, higher_is_better=not lower,
                             methods=methods)
    order = {m: i for i, m in enumerate(methods)}
    result["summary"].sort(key=lambda r: order[r["method"]])
    for row in result["summary"]:
        row["label"] = method_label(row["method"])
    for d in result["differences"]:
        d["label_a"], d["label_b"] = method_label(d["method_a"]), method_label(d["method_b"])
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
    lines = [(f"{result['task']} · {result['metric']} per query ({direction} is better) · {len(result['runs'])} "
              f"run(s), seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")]
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


def with_activity_bins(cells, bins: int = 4):
    """`Store.analysis_cells` with `bin` and its `history_min`/`history_max`: users (each once, however many
    seeds answered it) in up to `bins` bins of about equally many users by history size, never splitting one
    size (`oppu.analyses.activity_bins`, the bins of the Analyses page's Fig. 3)."""
    from oppu.analyses import activity_bins

    if cells.empty:
        return cells.assign(bin=[], history_min=[], history_max=[])
    ranges = activity_bins(cells.groupby("user_id")["history_size"].max().tolist(), bins)

    def which(size: int) -> int:
        return next(i for i, (lo, hi) in enumerate(ranges, start=1) if lo <= size <= hi)

    binned = cells.assign(bin=cells["history_size"].astype(int).map(which))
    return binned.assign(history_min=binned["bin"].map(lambda b: ranges[b - 1][0]),
                         history_max=binned["bin"].map(lambda b: ranges[b - 1][1]))


def grouped_intervals(cells, by: str, n_boot: int = N_BOOT, seed: int = 0, ci: float = 0.95):
    """Per (`by`, method) of a `Store.analysis_cells` frame (`with_activity_bins` for `by="bin"`): score (the query-weighted mean), ci_low, ci_high,
    n_users, n_queries, n_runs.

    The interval is `oppu.stats.method_summary`'s percentile cluster bootstrap, drawn from the cells: users are
    resampled, and the runs behind a point too when there are several (each run a replicate of its setting, with
    users crossed: one draw of users is shared by the drawn runs)."""
    import zlib

    import numpy as np
    import pandas as pd

    columns = [by, "method", "score", "ci_low", "ci_high", "n_users", "n_queries", "n_runs"]
    rows = []
    for (value, method), group in cells.groupby([by, "method"], sort=True, dropna=False):
        r_codes, r_levels = pd.factorize(group["run_id"], sort=True)
        u_codes, u_levels = pd.factorize(group["user_id"], sort=True)
        n_runs, n_users = len(r_levels), len(u_levels)
        S, N = np.zeros((n_runs, n_users)), np.zeros((n_runs, n_users))
        np.add.at(S, (r_codes, u_codes), group["s"].to_numpy(float))
        np.add.at(N, (r_codes, u_codes), group["n"].to_numpy(float))
        rng = np.random.default_rng([int(seed), zlib.crc32(f"{value}|{method}".encode())])
        w = (rng.multinomial(n_runs, np.full(n_runs, 1 / n_runs), size=n_boot) if n_runs > 1
             else np.ones((n_boot, 1)))
        # drawing users by index and summing the drawn columns is the multinomial-weights draw, gathered
        drawn = rng.integers(0, n_users, size=(n_boot, n_users))
        num = np.take_along_axis(w @ S, drawn, axis=1).sum(axis=1)
        den = np.take_along_axis(w @ N, drawn, axis=1).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            draws = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
        lo, hi = np.nanquantile(draws, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        rows.append({by: value, "method": method, "score": float(S.sum() / N.sum()), "ci_low": float(lo),
                     "ci_high": float(hi), "n_users": int(group["user_id"].nunique()), "n_queries": int(N.sum()),
                     "n_runs": n_runs})
    return pd.DataFrame(rows, columns=columns)


KEY_PAIRS = (("oppu", "rag"), ("oppu", "none"), ("oppu+rag", "rag"), ("oppu+pag", "pag"), ("rag", "none"))
"""The comparisons a summary leads with: a personal adapter against retrieval alone and against no
personalization, each adapter method against its twin without the adapter, and retrieval against nothing."""


def key_differences(scores, higher_is_better: bool = True, n_boot: int = N_BOOT, seed: int = 0,
                    pairs=KEY_PAIRS) -> list[dict[str, Any]]:
    """`oppu.stats.paired_difference` for each pair of `pairs` whose two methods both have scores, labelled."""
    from oppu.config import method_label
    from oppu.stats import paired_difference

    scores = as_replicates(scores)
    present = set(scores["method"])
    out = []
    for a, b in pairs:
        if a in present and b in present:
            d = paired_difference(scores, a, b, n_boot, seed, higher_is_better=higher_is_better)
            out.append({**d, "label_a": method_label(a), "label_b": method_label(b)})
    return out
