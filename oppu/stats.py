"""Uncertainty of LaMP scores: cluster-bootstrap intervals per method and paired comparisons between methods.

The input is one row per scored query: a DataFrame with columns `user_id`, `query_id`, `method`, `score` and
optionally `seed` (absent: one seed). `score` is the per-query score (1/0 accuracy, absolute error for LaMP_3,
ROUGE-L, ...), so a method's mean over all its rows is the LaMP run score.

Why users, not queries, are the unit of resampling: queries are nested in users (one adapter, one history per
user), so queries of one user are correlated and a query-level bootstrap gives intervals that are too narrow.
Resampling users (a resampled user brings all its queries) keeps that correlation. With several seeds the seeds
are resampled too; users are crossed with seeds (every seed scores the same users), so one draw of users is
shared by all drawn seeds, which keeps a user's effect across seeds instead of averaging it away.

- `method_summary`: per method, the query-weighted mean and its percentile bootstrap interval.
- `paired_difference`: mean difference a - b on the queries both methods answered, its bootstrap interval, a
  user-level sign-flip permutation p-value, and query wins/ties/losses.
- `format_difference`: one line for a report.
- `per_query_scores`, `compare_methods`, `format_comparison`: stored predictions -> the table and lines a
  results command prints.

Pure numpy/pandas: no store and no dashboard here. Every function is deterministic for a given `seed`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "query_id", "method", "score")
SEED_COLUMN = "seed"
DEFAULT_SEED = 0
"""The `seed` value given to every row when the scores have no seed column."""

N_BOOT = 2000
N_PERM = 10_000
CI = 0.95
EXACT_MAX_USERS = 16
"""Up to this many users the sign-flip test enumerates all 2**users sign patterns; above it samples `n_perm`."""

_CHUNK_CELLS = 1 << 21
"""Bootstrap / permutation draws are made in chunks of about this many numbers, so memory stays bounded."""
_TIE_TOL = 1e-12


# -- validation --------------------------------------------------------------------------------------------------
def _check_scores(df: Any) -> pd.DataFrame:
    """A validated copy with a `seed` column; the caller's frame is never modified."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame of per-query scores, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"per-query scores lack columns {missing}: need {list(REQUIRED_COLUMNS)} "
                         f"(and optionally {SEED_COLUMN!r})")
    if df.empty:
        raise ValueError("no per-query scores: the DataFrame is empty")
    out = df[[*REQUIRED_COLUMNS, *([SEED_COLUMN] if SEED_COLUMN in df.columns else [])]].copy()
    if SEED_COLUMN not in out.columns:
        out[SEED_COLUMN] = DEFAULT_SEED
    for c in ("user_id", "query_id", "method", SEED_COLUMN):
        if out[c].isna().any():
            raise ValueError(f"{int(out[c].isna().sum())} rows have no {c}: every row needs one")
    try:
        out["score"] = pd.to_numeric(out["score"], errors="raise").astype(float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"score must be numeric: {exc}") from None
    bad = ~np.isfinite(out["score"].to_numpy())
    if bad.any():
        row = out[bad].iloc[0]
        raise ValueError(f"{int(bad.sum())} rows have a missing or non-finite score (e.g. user {row.user_id!r}, "
                         f"query {row.query_id!r}, method {row.method!r}): drop queries without a gold first")
    key = ["user_id", "query_id", "method", SEED_COLUMN]
    dup = out.duplicated(key)
    if dup.any():
        row = out[dup].iloc[0]
        raise ValueError(f"{int(dup.sum())} rows repeat a (user_id, query_id, method, seed), e.g. "
                         f"({row.user_id!r}, {row.query_id!r}, {row.method!r}, {row.seed!r}): keep one score per "
                         "query, method and seed")
    return out


def _check_settings(n_boot: int, ci: float, n_perm: int | None = None) -> None:
    if not 0 < ci < 1:
        raise ValueError(f"ci must be between 0 and 1 (e.g. 0.95), got {ci!r}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot!r}")
    if n_perm is not None and int(n_perm) < 1:
        raise ValueError(f"n_perm must be at least 1, got {n_perm!r}")


def _check_method(df: pd.DataFrame, method: Any) -> None:
    known = list(pd.unique(df["method"]))
    if method not in known:
        raise ValueError(f"unknown method {method!r}: the scores hold {', '.join(map(str, sorted(known, key=str)))}")


# -- the maths ---------------------------------------------------------------------------------------------------
def _cells(df: pd.DataFrame, value: str = "score") -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per (seed, user) sums and counts of `value` as (seeds x users) matrices; zeros where a user lacks a seed."""
    g = df.groupby([SEED_COLUMN, "user_id"], sort=True)[value].agg(["sum", "count"])
    seeds = g.index.get_level_values(0)
    users = g.index.get_level_values(1)
    s_codes, s_levels = pd.factorize(seeds, sort=True)
    u_codes, u_levels = pd.factorize(users, sort=True)
    sums = np.zeros((len(s_levels), len(u_levels)))
    counts = np.zeros_like(sums)
    sums[s_codes, u_codes] = g["sum"].to_numpy()
    counts[s_codes, u_codes] = g["count"].to_numpy()
    return sums, counts, len(s_levels), len(u_levels)


def _bootstrap_means(sums: np.ndarray, counts: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """`n_boot` query-weighted means, each over a resample of seeds (rows) and, shared by them, users (columns).

    A draw is a pair of multinomial count vectors w (seeds) and v (users); its mean is
    sum_su w_s v_u S_su / sum_su w_s v_u N_su, i.e. the pooled mean over every query of the drawn cells.
    """
    n_seeds, n_users = sums.shape
    out = np.empty(n_boot)
    chunk = max(1, _CHUNK_CELLS // max(n_users, 1))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w = (rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=b) if n_seeds > 1
             else np.ones((b, 1), dtype=np.int64))
        v = rng.multinomial(n_users, np.full(n_users, 1 / n_users), size=b)
        num = ((w @ sums) * v).sum(axis=1)
        den = ((w @ counts) * v).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            # den is 0 only when the drawn users have no scores under the drawn seeds (users differ by seed)
            out[start:start + b] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return out


def _percentile_ci(draws: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval, interpolated as `np.percentile` does (as `scipy.stats.bootstrap` does too)."""
    alpha = (1 - ci) / 2
    lo, hi = np.nanquantile(draws, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _sign_flip_p(user_sums: np.ndarray, n_perm: int, rng: np.random.Generator) -> tuple[float, str]:
    """Two-sided p of sum_u T_u under random sign flips of each user's summed difference T_u.

    The query-weighted mean difference is sum_u T_u / N with N fixed under flips, so this tests the reported
    difference itself. Exact over all 2**users patterns up to `EXACT_MAX_USERS` users; otherwise `n_perm`
    random patterns with the +1 correction (the observed pattern counts as one), which keeps p valid.
    """
    t = np.asarray(user_sums, dtype=float)
    n = len(t)
    observed = abs(t.sum())
    # flipped sums equal to the observed one up to rounding count as "as extreme" (the usual tie convention)
    tol = _TIE_TOL * max(1.0, float(np.abs(t).sum()))
    if n <= EXACT_MAX_USERS:
        patterns = np.arange(2 ** n)[:, None] >> np.arange(n) & 1
        flipped = (1 - 2 * patterns) @ t
        return float(np.mean(np.abs(flipped) >= observed - tol)), "exact"
    hits = 0
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_perm, chunk):
        b = min(chunk, n_perm - start)
        signs = 1 - 2 * rng.integers(0, 2, size=(b, n))
        hits += int(np.sum(np.abs(signs @ t) >= observed - tol))
    return (hits + 1) / (n_perm + 1), "monte carlo"


def _method_rng(seed: int, method: Any) -> np.random.Generator:
    """One stream per method, so a method's interval does not change when other methods are added."""
    return np.random.default_rng([int(seed), zlib.crc32(str(method).encode())])


# -- public API --------------------------------------------------------------------------------------------------
def method_summary(df: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0, ci: float = CI) -> pd.DataFrame:
    """Per method: the query-weighted mean score and its percentile cluster-bootstrap interval.

    Columns: method, mean, ci_low, ci_high, n_users, n_queries (distinct user/query pairs), n_seeds; one row per
    method, sorted by method. The interval resamples users (and seeds when there are several), never queries.
    """
    scores = _check_scores(df)
    _check_settings(n_boot, ci)
    rows = []
    for method, group in scores.groupby("method", sort=True):
        sums, counts, n_seeds, n_users = _cells(group)
        lo, hi = _percentile_ci(_bootstrap_means(sums, counts, int(n_boot), _method_rng(seed, method)), ci)
        rows.append({"method": method, "mean": float(group["score"].mean()), "ci_low": lo, "ci_high": hi,
                     "n_users": n_users, "n_queries": len(group[["user_id", "query_id"]].drop_duplicates()),
                     "n_seeds": n_seeds})
    return pd.DataFrame(rows, columns=["method", "mean", "ci_low", "ci_high", "n_users", "n_queries", "n_seeds"])


def paired_difference(df: pd.DataFrame, method_a: Any, method_b: Any, n_boot: int = N_BOOT, seed: int = 0,
                      ci: float = CI, *, higher_is_better: bool = True, n_perm: int = N_PERM) -> dict[str, Any]:
    """Method a minus method b on the queries both answered, matched by (user_id, query_id, seed).

    Returns a dict with
    - method_a, method_b; mean_a, mean_b (on the shared queries); diff = mean_a - mean_b;
    - ci_low, ci_high: percentile cluster-bootstrap interval of diff (users resampled; seeds too if several);
    - p_value: two-sided, from the user-level sign-flip permutation test; permutation: "exact" or "monte carlo";
    - wins, ties, losses: shared (query, seed) pairs where a is better, equal, worse. "Better" is the higher
      score, or the lower one with `higher_is_better=False` (absolute error, MAE); diff is always a - b;
    - n_users, n_queries (distinct shared user/query pairs), n_pairs (= wins + ties + losses), n_seeds;
    - the settings: ci, n_boot, n_perm, seed, higher_is_better.
    """
    scores = _check_scores(df)
    _check_settings(n_boot, ci, n_perm)
    _check_method(scores, method_a)
    _check_method(scores, method_b)
    key = ["user_id", "query_id", SEED_COLUMN]
    a = scores[scores["method"] == method_a].set_index(key)["score"]
    b = scores[scores["method"] == method_b].set_index(key)["score"]
    pairs = pd.concat({"a": a, "b": b}, axis=1, join="inner").reset_index()
    if pairs.empty:
        raise ValueError(f"{method_a!r} and {method_b!r} share no (user_id, query_id, seed): compare methods "
                         "scored on the same queries (and seeds)")
    pairs["d"] = pairs["a"] - pairs["b"]
    rng = np.random.default_rng(int(seed))
    sums, counts, n_seeds, n_users = _cells(pairs, "d")
    lo, hi = _percentile_ci(_bootstrap_means(sums, counts, int(n_boot), rng), ci)
    p, how = _sign_flip_p(sums.sum(axis=0), int(n_perm), rng)
    d = pairs["d"].to_numpy()
    tie = np.abs(d) <= _TIE_TOL
    better = (d > 0) if higher_is_better else (d < 0)
    return {
        "method_a": method_a, "method_b": method_b,
        "mean_a": float(pairs["a"].mean()), "mean_b": float(pairs["b"].mean()), "diff": float(d.mean()),
        "ci_low": lo, "ci_high": hi, "p_value": p, "permutation": how,
        "wins": int(np.sum(better & ~tie)), "ties": int(np.sum(tie)), "losses": int(np.sum(~better & ~tie)),
        "n_users": n_users, "n_queries": len(pairs[["user_id", "query_id"]].drop_duplicates()),
        "n_pairs": len(pairs), "n_seeds": n_seeds,
        "ci": float(ci), "n_boot": int(n_boot), "n_perm": int(n_perm), "seed": int(seed),
        "higher_is_better": bool(higher_is_better),
    }


def _format_p(p: float) -> str:
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def format_difference(d: dict[str, Any]) -> str:
    """One line from `paired_difference`: "OPPU vs RAG: +0.083 [-0.021, +0.190], p=0.31 (12 users, 71 queries)"."""
    try:
        seeds = f", {d['n_seeds']} seeds" if d.get("n_seeds", 1) > 1 else ""
        return (f"{d['method_a']} vs {d['method_b']}: {d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], "
                f"{_format_p(d['p_value'])} ({d['n_users']} users, {d['n_queries']} queries{seeds})")
    except KeyError as exc:
        raise ValueError(f"format_difference needs a paired_difference result; {exc} is missing") from None


# -- for a results command ---------------------------------------------------------------------------------------
SCORE_COLUMNS = {"official": "correct", "lenient": "lenient_correct"}
"""The per-row score column of stored predictions under each scoring."""


def per_query_scores(predictions: pd.DataFrame, scoring: str = "official", seed_column: str | None = None
                     ) -> pd.DataFrame:
    """Stored prediction rows -> the per-query scores this module reads.

    Takes `user_id`, `query_id`, `method` and the scoring's score column (`correct` or `lenient_correct`);
    `seed_column` names a column to use as the seed (e.g. `run_id` when runs repeat one config with different
    seeds). Rows without a score (queries without a gold) are dropped.
    """
    if scoring not in SCORE_COLUMNS:
        raise ValueError(f"unknown scoring {scoring!r}: use one of {', '.join(SCORE_COLUMNS)}")
    column = SCORE_COLUMNS[scoring]
    need = ["user_id", "query_id", "method", column, *([seed_column] if seed_column else [])]
    missing = [c for c in need if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack columns {missing}: need {need}")
    out = predictions[need].rename(columns={column: "score", **({seed_column: SEED_COLUMN} if seed_column else {})})
    return out[out["score"].notna()].reset_index(drop=True)


def compare_methods(df: pd.DataFrame, reference: Any, n_boot: int = N_BOOT, seed: int = 0, ci: float = CI, *,
                    higher_is_better: bool = True, n_perm: int = N_PERM,
                    methods: Sequence[Any] | None = None) -> dict[str, Any]:
    """Everything a results command prints: {"summary": method_summary records, "differences": one
    paired_difference per other method (method - reference), "settings": {...}}, JSON-serialisable."""
    scores = _check_scores(df)
    _check_method(scores, reference)
    others = [m for m in (methods if methods is not None else sorted(pd.unique(scores["method"]), key=str))
              if m != reference]
    for m in others:
        _check_method(scores, m)
    summary = method_summary(scores, n_boot, seed, ci)
    return {
        "summary": summary.to_dict(orient="records"),
        "differences": [paired_difference(scores, m, reference, n_boot, seed, ci,
                                          higher_is_better=higher_is_better, n_perm=n_perm) for m in others],
        "settings": {"reference": reference, "n_boot": int(n_boot), "n_perm": int(n_perm), "seed": int(seed),
                     "ci": float(ci), "higher_is_better": bool(higher_is_better),
                     "resampling": "users (and seeds when several), percentile interval",
                     "test": "two-sided sign-flip permutation of per-user summed differences"},
    }


def format_comparison(result: dict[str, Any]) -> list[str]:
    """Lines for `compare_methods`' result: one per method (mean and interval), then one per difference."""
    s = result["settings"]
    pct = f"{s['ci']:.0%}"
    lines = [f"{r['method']}: {r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
             f"({r['n_users']} users, {r['n_queries']} queries"
             + (f", {r['n_seeds']} seeds)" if r["n_seeds"] > 1 else ")") for r in result["summary"]]
    lines += [format_difference(d) + f"  wins/ties/losses {d['wins']}/{d['ties']}/{d['losses']}"
              for d in result["differences"]]
    lines.append(f"({pct} percentile intervals from {s['n_boot']} bootstrap resamples of users; p: "
                 f"{s['test']}; {'higher' if s['higher_is_better'] else 'lower'} is better)")
    return lines
