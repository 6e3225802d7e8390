"""oppu.stats: the bootstrap and the sign-flip test against scipy and hand-computed cases, and the properties a
reviewer checks (fewer users -> wider intervals, a method equals itself, wins/ties/losses add up)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from oppu.stats import (
    compare_methods,
    format_comparison,
    format_difference,
    method_summary,
    paired_difference,
    per_query_scores,
)


def scores(per_user: dict[str, list[float]], method: str = "m", seed: int | None = None) -> pd.DataFrame:
    """Rows user_id, query_id, method, score (and seed) from {user: [score per query]}."""
    rows = [{"user_id": u, "query_id": f"{u}-q{i}", "method": method, "score": s,
             **({"seed": seed} if seed is not None else {})}
            for u, values in per_user.items() for i, s in enumerate(values)]
    return pd.DataFrame(rows)


def two_methods(a: dict[str, list[float]], b: dict[str, list[float]]) -> pd.DataFrame:
    return pd.concat([scores(a, "A"), scores(b, "B")], ignore_index=True)


def random_users(rng: np.random.Generator, n_users: int, max_queries: int = 6) -> dict[str, list[float]]:
    return {f"u{i}": list(rng.random(rng.integers(1, max_queries + 1))) for i in range(n_users)}


# -- method_summary ----------------------------------------------------------------------------------------------
def test_bootstrap_with_one_query_per_user_matches_scipy_percentile():
    x = np.random.default_rng(1).normal(0.5, 0.2, size=30)
    n_boot = 4000
    ours = method_summary(scores({f"u{i}": [v] for i, v in enumerate(x)}), n_boot=n_boot, seed=3).iloc[0]
    ref = sps.bootstrap((x,), np.mean, n_resamples=n_boot, method="percentile", rng=np.random.default_rng(4))
    # Monte Carlo error of a 2.5% / 97.5% quantile of B draws from ~Normal(., s): sqrt(q(1-q)/B) * s / phi(z_q)
    # = 2.67 s / sqrt(B); the two independent estimates differ by sqrt(2) times that. Allow 4 of those SEs.
    s = x.std() / np.sqrt(len(x))
    tol = 4 * np.sqrt(2) * np.sqrt(0.025 * 0.975 / n_boot) * s / sps.norm.pdf(1.96)
    assert ours["mean"] == pytest.approx(x.mean())
    assert ours["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=tol)
    assert ours["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=tol)


def test_two_users_hand_computed_cluster_bootstrap():
    # A has one query (1), B three (0, 0, 0): the query-weighted mean is 1/4. Resampling users gives {A, A} -> 1,
    # {B, B} -> 0, {A, B} -> 1/4 with probabilities 1/4, 1/2, 1/4, so the 95% percentile interval is [0, 1]
    # (each end holds 25% of the draws, far more than 2.5%); a query-level bootstrap would give a narrower one.
    out = method_summary(scores({"A": [1.0], "B": [0.0, 0.0, 0.0]}), n_boot=400).iloc[0]
    assert (out["mean"], out["ci_low"], out["ci_high"]) == (0.25, 0.0, 1.0)
    assert (out["n_users"], out["n_queries"], out["n_seeds"]) == (2, 4, 1)


def test_intervals_widen_when_users_are_removed():
    # The same per-user data, 4 users vs those 4 repeated 16 times: the resampling distribution of the mean
    # has 1/16 of the variance with 64 users, so its interval is ~4x narrower; far beyond Monte Carlo error.
    few = {"a": [1, 0, 1], "b": [0, 0], "c": [1, 1, 1, 0], "d": [0]}
    many = {f"{u}{k}": v for k in range(16) for u, v in few.items()}
    for seed in range(3):
        w_few = method_summary(scores(few), n_boot=500, seed=seed).eval("ci_high - ci_low").iloc[0]
        w_many = method_summary(scores(many), n_boot=500, seed=seed).eval("ci_high - ci_low").iloc[0]
        assert w_many < w_few / 2


def test_seed_variation_widens_the_interval():
    rng = np.random.default_rng(0)
    base = random_users(rng, 10)
    shifted = pd.concat([scores({u: [s + 0.3 * k for s in v] for u, v in base.items()}, seed=k) for k in range(3)],
                        ignore_index=True)
    pooled = shifted.assign(query_id=shifted["query_id"] + "-s" + shifted["seed"].astype(str)).drop(columns="seed")
    with_seeds = method_summary(shifted, n_boot=500).iloc[0]
    one_seed = method_summary(pooled, n_boot=500).iloc[0]
    assert with_seeds["n_seeds"] == 3 and one_seed["n_seeds"] == 1
    assert with_seeds["mean"] == pytest.approx(one_seed["mean"])
    assert with_seeds["ci_high"] - with_seeds["ci_low"] > 2 * (one_seed["ci_high"] - one_seed["ci_low"])


def test_summary_is_deterministic_per_method_and_seed():
    rng = np.random.default_rng(2)
    df = pd.concat([scores(random_users(rng, 8), "A"), scores(random_users(rng, 8), "B")], ignore_index=True)
    first = method_summary(df, n_boot=300, seed=5)
    pd.testing.assert_frame_equal(first, method_summary(df, n_boot=300, seed=5))
    # a method's interval does not depend on which other methods are in the frame
    alone = method_summary(df[df.method == "A"], n_boot=300, seed=5)
    pd.testing.assert_frame_equal(first.iloc[:1], alone)
    assert not method_summary(df, n_boot=300, seed=6).equals(first)
    assert list(first["method"]) == ["A", "B"]


# -- paired_difference -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("user_sums", "p"), [([1.0, 2.0, 4.0], 2 / 8), ([3.0, -1.0, 1.0], 6 / 8)])
def test_exact_sign_flip_p_on_hand_computable_cases(user_sums, p):
    # [1, 2, 4]: of the 8 flipped sums (+-1 +-2 +-4) only +7 and -7 reach |7|, so p = 2/8. [3, -1, 1]: the
    # flipped sums of +-3 +-1 +-1 are 5, 3, 3, 1 and their negatives; 6 of 8 reach the observed |3|.
    a = {f"u{i}": [t] for i, t in enumerate(user_sums)}
    b = {f"u{i}": [0.0] for i in range(len(user_sums))}
    out = paired_difference(two_methods(a, b), "A", "B", n_boot=100)
    assert out["permutation"] == "exact"
    assert out["p_value"] == pytest.approx(p)


def test_sign_flip_p_matches_scipy_permutation_test_on_user_sums():
    rng = np.random.default_rng(7)
    a = random_users(rng, 10)
    b = {u: list(np.array(v) - 0.15 + rng.normal(0, 0.3, len(v))) for u, v in a.items()}
    out = paired_difference(two_methods(a, b), "A", "B", n_boot=100)
    sum_a = np.array([sum(a[u]) for u in sorted(a)])
    sum_b = np.array([sum(b[u]) for u in sorted(b)])
    # permutation_type="samples" swaps a_u and b_u within a user, i.e. flips the sign of the user's summed
    # difference; with 2**10 <= n_resamples scipy enumerates them all, as we do
    ref = sps.permutation_test((sum_a, sum_b), lambda x, y, axis: np.sum(x - y, axis=axis), vectorized=True,
                               permutation_type="samples", n_resamples=10_000)
    assert out["p_value"] == pytest.approx(ref.pvalue, abs=1e-12)


def test_monte_carlo_sign_flip_p_is_close_to_exact_and_corrected():
    rng = np.random.default_rng(8)
    a = random_users(rng, 18, max_queries=3)
    b = {u: list(np.array(v) - 0.1 + rng.normal(0, 0.4, len(v))) for u, v in a.items()}
    n_perm = 4000
    out = paired_difference(two_methods(a, b), "A", "B", n_boot=100, n_perm=n_perm)
    assert out["permutation"] == "monte carlo"
    t = np.array([sum(a[u]) - sum(b[u]) for u in sorted(a)])
    signs = 1 - 2 * (np.arange(2 ** 18)[:, None] >> np.arange(18) & 1)
    exact = np.mean(np.abs(signs @ t) >= abs(t.sum()) - 1e-9)
    # binomial Monte Carlo error sqrt(p(1-p)/n_perm), plus the +1 correction's bias of at most 1/(n_perm+1)
    assert abs(out["p_value"] - exact) < 4 * np.sqrt(exact * (1 - exact) / n_perm) + 1 / (n_perm + 1)
    assert out["p_value"] >= 1 / (n_perm + 1)


def test_a_method_against_itself_shows_no_difference():
    rng = np.random.default_rng(3)
    df = scores(random_users(rng, 20))
    out = paired_difference(df, "m", "m", n_boot=200)
    assert (out["diff"], out["ci_low"], out["ci_high"], out["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert (out["wins"], out["losses"], out["ties"]) == (0, 0, len(df))


def test_a_clear_difference_is_found():
    rng = np.random.default_rng(4)
    b = random_users(rng, 12)
    a = {u: [s + 0.2 for s in v] for u, v in b.items()}
    out = paired_difference(two_methods(a, b), "A", "B", n_boot=300)
    assert out["diff"] == pytest.approx(0.2)
    assert out["ci_low"] == pytest.approx(0.2) and out["ci_high"] == pytest.approx(0.2)
    assert out["p_value"] == pytest.approx(2 / 2 ** 12)


def test_wins_ties_losses_add_up_to_shared_queries_and_flip_for_errors():
    a = {"u1": [1, 0, 1], "u2": [0, 1], "u3": [3.0]}
    b = {"u1": [0, 0, 1], "u2": [1, 1], "u4": [1.0]}   # u3 and u4 are not shared
    df = two_methods(a, b)
    up = paired_difference(df, "A", "B", n_boot=100)
    down = paired_difference(df, "A", "B", n_boot=100, higher_is_better=False)
    assert (up["wins"], up["ties"], up["losses"]) == (1, 3, 1)
    assert up["wins"] + up["ties"] + up["losses"] == up["n_pairs"] == up["n_queries"] == 5
    assert (down["wins"], down["ties"], down["losses"]) == (up["losses"], up["ties"], up["wins"])
    assert down["diff"] == up["diff"] == pytest.approx(0.0)
    assert up["n_users"] == 2 and up["mean_a"] == pytest.approx(0.6)


def test_pairs_are_matched_by_seed_too():
    df = pd.concat([scores({"u1": [1, 1]}, "A", seed=0), scores({"u1": [0, 0]}, "B", seed=0),
                    scores({"u1": [0, 0]}, "A", seed=1), scores({"u2": [1.0]}, "B", seed=1)], ignore_index=True)
    out = paired_difference(df, "A", "B", n_boot=50)
    assert (out["n_pairs"], out["n_seeds"], out["diff"], out["wins"]) == (2, 1, 1.0, 2)


# -- formatting and the results-command helpers -----------------------------------------------------------------
def test_format_difference():
    d = {"method_a": "OPPU", "method_b": "RAG", "diff": 0.0834, "ci_low": -0.0211, "ci_high": 0.19,
         "p_value": 0.3123, "n_users": 12, "n_queries": 71, "n_seeds": 1}
    assert format_difference(d) == "OPPU vs RAG: +0.083 [-0.021, +0.190], p=0.31 (12 users, 71 queries)"
    assert format_difference({**d, "p_value": 0.0004, "n_seeds": 3}).endswith("p<0.001 (12 users, 71 queries, 3 seeds)")
    with pytest.raises(ValueError, match="paired_difference"):
        format_difference({"diff": 0.1})


def test_compare_methods_from_stored_predictions():
    preds = pd.DataFrame({"run_id": "r1", "user_id": ["u1", "u1", "u2", "u2", "u3", "u3"],
                          "query_id": ["q1", "q1", "q2", "q2", "q3", "q3"],
                          "method": ["OPPU", "RAG"] * 3, "correct": [1.0, 0.0, 1.0, 1.0, None, 0.0],
                          "lenient_correct": [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]})
    df = per_query_scores(preds)
    assert len(df) == 5 and list(df.columns) == ["user_id", "query_id", "method", "score"]
    result = compare_methods(df, "RAG", n_boot=100)
    assert [r["method"] for r in result["summary"]] == ["OPPU", "RAG"]
    [d] = result["differences"]
    assert (d["method_a"], d["method_b"], d["n_queries"]) == ("OPPU", "RAG", 2)
    lines = format_comparison(result)
    assert lines[2].startswith("OPPU vs RAG: +0.500") and "1/1/0" in lines[2]
    assert len(per_query_scores(preds, "lenient", seed_column="run_id")) == 6


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    (lambda df: df.drop(columns="score"), r"lack columns \['score'\]"),
    (lambda df: df.iloc[:0], "empty"),
    (lambda df: df.assign(score=[np.nan] + [1.0] * (len(df) - 1)), "drop queries without a gold"),
    (lambda df: df.assign(score="x"), "numeric"),
    (lambda df: pd.concat([df, df.iloc[:1]]), "repeat a"),
])
def test_bad_scores_are_refused_with_a_reason(change, message):
    df = two_methods({"u1": [1, 0]}, {"u1": [0, 0]})
    with pytest.raises(ValueError, match=message):
        method_summary(change(df), n_boot=10)


def test_unknown_method_and_no_shared_queries_are_refused():
    df = two_methods({"u1": [1, 0]}, {"u2": [0, 0]})
    with pytest.raises(ValueError, match="unknown method 'C': the scores hold A, B"):
        paired_difference(df, "A", "C")
    with pytest.raises(ValueError, match="share no"):
        paired_difference(df, "A", "B")
    with pytest.raises(ValueError, match="ci must be"):
        method_summary(df, ci=95)
    with pytest.raises(TypeError, match="expected a pandas DataFrame"):
        method_summary([1, 2])
