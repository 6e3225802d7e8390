"""Pure pandas transforms behind the dashboard's tables (no Streamlit, no I/O), testable on their own.

Uncertainty (`interval_table`, `difference_table`, `query_outcomes`) reads the results of `oppu.uncertainty`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from dashboard.charts import method_label, sort_methods

# Plain check marks (not emoji): they render with ordinary fonts, also in headless browsers without emoji fonts.
CORRECT, WRONG = "✓", "✗"
_CELL_COLORS = {CORRECT: "background-color: #EBFBEE; color: #2B8A3E", WRONG: "background-color: #FFF5F5; color: #C92A2A"}


def user_sizes(data) -> pd.DataFrame:
    """One row per user of a TaskData: id, split, history size and query count, most active first."""
    rows = [{"user_id": u.id, "split": split, "history_size": len(u.history), "queries": len(u.queries)}
            for split, users in (("test", data.test_users), ("train", data.train_users)) for u in users]
    frame = pd.DataFrame(rows, columns=["user_id", "split", "history_size", "queries"])
    return frame.sort_values(["history_size", "user_id"], ascending=[False, True], ignore_index=True)


def history_frame(user) -> pd.DataFrame:
    """A user's history items: id, date, then every field the items carry (the task's fields)."""
    return pd.DataFrame([{"id": item.id, "date": item.date, **dict(item.fields)} for item in user.history])


def queries_frame(user) -> pd.DataFrame:
    rows = [{"id": q.id, "date": q.date, "input": q.input, "gold": q.gold} for q in user.queries]
    return pd.DataFrame(rows, columns=["id", "date", "input", "gold"])


def mark(output: str, score: float | None, kind: str) -> str:
    """One answer cell: a ✅/❌ for labels, the absolute error for ratings, ROUGE-L for generated text."""
    if score is None or pd.isna(score):
        return str(output)
    if kind == "classification":
        return f"{CORRECT if score >= 1.0 else WRONG} {output}"
    if kind == "rating":
        return f"{CORRECT if score == 0 else WRONG} {output}  (off by {score:g})"
    return f"{output}  ·  ROUGE-L {score:.2f}"


def mark_style(cell) -> str:
    """CSS for one side-by-side cell: green when marked correct, red when marked wrong."""
    return _CELL_COLORS.get(str(cell)[:1], "")


SCORED_COLUMNS: dict[str, tuple[str, str]] = {"official": ("output", "correct"),
                                              "lenient": ("lenient_output", "lenient_correct")}
"""(answer, per-row score) columns of a predictions frame under each scoring (see `oppu.metrics.SCORINGS`)."""


def side_by_side(predictions: pd.DataFrame, kind: str, methods_first: Sequence[str] = (),
                 scoring: str = "official") -> pd.DataFrame:
    """Long predictions (`query_id`, `input`, `gold`, `method`, and the answer and per-row score columns of
    `scoring`: `output`/`correct` officially, `lenient_output`/`lenient_correct` leniently) to one row per query
    with one column per method, labelled for people, `methods_first` (OPPU, retrieval-only) leading."""
    if predictions.empty:
        return pd.DataFrame(columns=["query", "input", "gold"])
    output, correct = SCORED_COLUMNS[scoring]
    cells = predictions.assign(cell=[mark(o, c, kind) for o, c in zip(predictions[output], predictions[correct])])
    wide = cells.pivot_table(index="query_id", columns="method", values="cell", aggfunc="first", sort=False)
    present = list(wide.columns)
    methods = list(dict.fromkeys([*[m for m in methods_first if m in present], *sort_methods(present)]))
    first = predictions.drop_duplicates("query_id").set_index("query_id")
    table = wide[methods].rename(columns=method_label)
    table.insert(0, "gold", first["gold"].reindex(table.index))
    table.insert(0, "input", first["input"].reindex(table.index) if "input" in first else "")
    table.columns.name = None
    return table.rename_axis("query").reset_index()


def duration(seconds) -> str:
    if seconds is None or pd.isna(seconds):
        return "–"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s"


def interval_table(result: dict) -> pd.DataFrame:
    """An `oppu.uncertainty.summarize` result as one row per method: mean, 95% interval, users, queries, seeds."""
    pct = f"{result['settings']['ci']:.0%}"
    rows = [{"method": r["label"], "mean": f"{r['mean']:.3f}", f"{pct} CI": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
             "users": int(r["n_users"]), "queries": int(r["n_queries"]), "seeds": int(r["n_seeds"])}
            for r in result["summary"]]
    return pd.DataFrame(rows, columns=["method", "mean", f"{pct} CI", "users", "queries", "seeds"])


def difference_table(differences: Sequence[dict]) -> pd.DataFrame:
    """Paired differences (`oppu.stats.paired_difference`, labelled) as one row each: difference, interval, p,
    and the queries the first method wins, ties and loses."""
    from oppu.uncertainty import format_p

    rows = [{"comparison": f"{d['label_a']} vs {d['label_b']}", "difference": f"{d['diff']:+.3f}",
             "95% CI": f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]", "p": format_p(d["p_value"]),
             "wins": int(d["wins"]), "ties": int(d["ties"]), "losses": int(d["losses"])} for d in differences]
    return pd.DataFrame(rows, columns=["comparison", "difference", "95% CI", "p", "wins", "ties", "losses"])


OUTCOMES = ("a", "tie", "b")
"""Per query of two methods a and b: a scores better, both score the same, b scores better."""


def query_outcomes(predictions: pd.DataFrame, method_a: str, method_b: str, scoring: str = "official",
                   lower_is_better: bool = False) -> pd.Series:
    """query_id -> "a", "tie" or "b" for the queries both methods answered and scored (the per-row score of
    `scoring`; lower is better for ratings' absolute error), in the predictions' query order."""
    score = SCORED_COLUMNS[scoring][1]
    wide = predictions[predictions["method"].isin([method_a, method_b])].pivot_table(
        index="query_id", columns="method", values=score, aggfunc="first", sort=False)
    if method_a not in wide.columns or method_b not in wide.columns:
        return pd.Series(dtype=object, name="outcome")
    wide = wide.dropna(subset=[method_a, method_b])
    d = wide[method_a] - wide[method_b]
    if lower_is_better:
        d = -d
    outcome = pd.Series("tie", index=wide.index, name="outcome")
    outcome[d > 1e-12] = "a"
    outcome[d < -1e-12] = "b"
    return outcome
