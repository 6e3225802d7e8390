"""Pure pandas transforms behind the dashboard's tables (no Streamlit, no I/O), testable on their own."""

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
