"""oppu.uncertainty and the dashboard's pure interval pieces: grouped intervals from cells agree with
oppu.stats on the rows behind them, activity bins match the store's, error bars and counts on every chart kind,
and the interval, difference and per-query outcome tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashboard import charts, tables
from oppu.stats import method_summary
from oppu.store import Store
from oppu.uncertainty import (
    as_replicates,
    difference_line,
    format_lines,
    grouped_intervals,
    key_differences,
    summarize,
    with_activity_bins,
)


def _rows(n_users=30, n_queries=6, runs=("r0",), seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    skill = rng.uniform(0.2, 0.8, n_users)
    rows = [{"run_id": r, "seed": i, "task": "LaMP_2M", "user_id": f"u{u}", "query_id": f"u{u}-q{q}",
             "method": m, "score": float(rng.random() < skill[u] + (0.1 if m == "oppu" else 0))}
            for i, r in enumerate(runs) for u in range(n_users) for q in range(n_queries) for m in ("none", "oppu")]
    return pd.DataFrame(rows)


def _cells(rows: pd.DataFrame) -> pd.DataFrame:
    return (rows.assign(k=0).groupby(["k", "method", "run_id", "user_id"], as_index=False)
            .agg(s=("score", "sum"), n=("score", "count")))


@pytest.mark.parametrize("runs", [("r0",), ("r0", "r1", "r2")])
def test_grouped_intervals_from_cells_agree_with_the_bootstrap_over_rows(runs):
    rows = _rows(runs=runs)
    found = grouped_intervals(_cells(rows), "k", n_boot=4000).set_index("method")
    expected = method_summary(rows.assign(seed=rows["run_id"]), n_boot=4000).set_index("method")
    for m in ("none", "oppu"):
        assert found.loc[m, "score"] == pytest.approx(expected.loc[m, "mean"])
        assert found.loc[m, "ci_low"] == pytest.approx(expected.loc[m, "ci_low"], abs=0.02)
        assert found.loc[m, "ci_high"] == pytest.approx(expected.loc[m, "ci_high"], abs=0.02)
        assert found.loc[m, "n_users"] == 30 and found.loc[m, "n_queries"] == 30 * 6 * len(runs)
        assert found.loc[m, "n_runs"] == len(runs)


def test_activity_bins_match_the_analyses_page(tmp_path):
    from oppu.analyses import Comparison, comparable_frame

    store = Store(tmp_path / "s.duckdb")
    store.create_run("r", {"task": "LaMP_2M"}, "LaMP_2M", "m", "f", "v")
    rows = [{"run_id": "r", "task": "LaMP_2M", "user_id": f"u{u}", "query_id": f"q{u}-{q}", "method": "none",
             "k": 0, "peft": "", "retriever": "", "prompt": "p", "raw_output": "comedy", "output": "comedy",
             "gold": "comedy" if (u + q) % 3 else "war", "retrieved_ids": [], "retrieved_scores": [],
             "history_size": 3 + (u * 7) % 11} for u in range(10) for q in range(3)]
    store.add_predictions(rows)
    cells = store.analysis_cells("LaMP_2M")
    points = comparable_frame("activity", cells, Comparison("activity", ("r",), {"r": ""}, {}))
    binned = with_activity_bins(cells, 4)
    found = grouped_intervals(binned, "bin", n_boot=200)
    merged = points.merge(found, on=["bin", "method"], suffixes=("", "_ci"))
    assert len(merged) == len(points) >= 3
    assert np.allclose(merged["score"], merged["score_ci"])
    assert list(merged["users"]) == list(merged["n_users"]) and list(merged["n"]) == list(merged["n_queries"])
    assert (merged["ci_low"] <= merged["score"]).all() and (merged["score"] <= merged["ci_high"]).all()
    spans = binned.drop_duplicates("bin").set_index("bin")[["history_min", "history_max"]]
    assert spans.to_dict("index") == points.set_index("bin")[["history_min", "history_max"]].to_dict("index")


def test_runs_that_repeat_a_seed_are_resampled_as_runs():
    rows = _rows(runs=("a", "b")).assign(seed=0)  # the same config run twice: both have seed 0
    assert as_replicates(rows)["seed"].nunique() == 2
    result = summarize(rows)
    assert result["seeds"] == [0] and {r["n_seeds"] for r in result["summary"]} == {2}
    (d,) = key_differences(rows)
    assert d["method_a"] == "oppu" and d["method_b"] == "none"
    assert difference_line(d).startswith("OPPU vs Non-personalized: +")


def test_every_chart_kind_draws_error_bars_and_counts():
    ci = {"ci_low": [0.3, 0.5], "ci_high": [0.6, 0.9], "n_users": [10, 12], "n_queries": [40, 50]}
    k = pd.DataFrame({"k": [1, 2], "method": ["rag", "rag"], "score": [0.4, 0.7], **ci})
    fig = charts.k_sweep(k, "accuracy")
    up, down = list(fig.data[0].error_y.array), list(fig.data[0].error_y.arrayminus)
    assert up == pytest.approx([0.2, 0.2]) and down == pytest.approx([0.1, 0.2])
    assert "10 users" in fig.data[0].customdata[0] and "40 queries" in fig.data[0].customdata[0]
    bars = charts.peft_comparison(pd.DataFrame({"peft": ["lora", "ia3"], "method": ["oppu", "oppu"],
                                                "score": [0.4, 0.7], **ci}), "accuracy")
    assert list(bars.data[0].error_y.array) == pytest.approx([0.2, 0.2])
    metric = charts.metric_bars(pd.DataFrame({"method": ["oppu"], "metric": ["accuracy"], "value": [0.5],
                                              "ci_low": [0.4], "ci_high": [0.7]}))
    assert list(metric.data[0].error_y.array) == pytest.approx([0.2])
    summary = pd.DataFrame({"method": ["none", "oppu"], "mean": [0.4, 0.7], "ci_low": [0.3, 0.5],
                            "ci_high": [0.6, 0.9], "n_users": [10, 10], "n_queries": [40, 40], "n_seeds": [3, 3]})
    fig = charts.method_intervals(summary, "accuracy")
    assert [t.name for t in fig.data] == ["OPPU", "Non-personalized"]  # the dashboard's method order
    assert "3 seeds" in fig.data[0].customdata[0]
    # without interval columns a chart draws no error bars (and still draws)
    plain = charts.k_sweep(k.drop(columns=["ci_low", "ci_high"]), "accuracy")
    assert plain.data[0].error_y.array is None


def test_interval_difference_and_outcome_tables():
    result = summarize(_rows())
    table = tables.interval_table(result)
    assert list(table["method"]) == ["Non-personalized", "OPPU"] and table["95% CI"].str.startswith("[").all()
    diffs = tables.difference_table(result["differences"])
    assert list(diffs["comparison"]) == ["OPPU vs Non-personalized"]
    d = result["differences"][0]
    assert diffs.iloc[0][["wins", "ties", "losses"]].tolist() == [d["wins"], d["ties"], d["losses"]]
    preds = pd.DataFrame({"query_id": ["q1", "q1", "q2", "q2", "q3", "q3"],
                          "method": ["oppu", "rag"] * 3, "correct": [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]})
    assert tables.query_outcomes(preds, "oppu", "rag").to_dict() == {"q1": "a", "q2": "tie", "q3": "b"}
    errors = preds.assign(correct=[0.0, 2.0, 1.0, 1.0, 3.0, 1.0])  # absolute errors: lower is better
    assert tables.query_outcomes(errors, "oppu", "rag", lower_is_better=True).to_dict() == {
        "q1": "a", "q2": "tie", "q3": "b"}
    assert tables.query_outcomes(preds, "oppu", "pag").empty


def test_a_rating_task_compares_absolute_errors_lower_better():
    rows = _rows(n_users=8, n_queries=3).assign(task="LaMP_3")
    rows.loc[rows["method"] == "oppu", "score"] = 0.0  # no error at all
    rows.loc[rows["method"] == "none", "score"] = 2.0
    result = summarize(rows)
    assert result["lower_is_better"] and result["metric"] == "absolute error"
    (d,) = result["differences"]
    assert d["diff"] == -2.0 and d["wins"] == 24 and d["losses"] == 0
    assert "lower is better" in "\n".join(format_lines(result))
