"""Pure plotly figure builders for the dashboard: each takes a DataFrame and returns a Figure.

No Streamlit and no I/O here, so every chart is testable on its own. Each builder names the columns it reads and
raises `ChartDataError` (saying which column is missing) rather than drawing a misleading empty chart.

Uncertainty: every bar and line builder draws an error bar on each point whose row carries `ci_low` and `ci_high`
(an interval from `oppu.uncertainty`), and shows `n_users` / `n_queries` (or `users` / `n`) in its hover text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
import plotly.graph_objects as go

from oppu.config import METHODS

# The paper's rows in the order the dashboard lists them: personal adapters first, then the baselines; the
# profile-only variants last. Legends show each method's paper label (`oppu.config.METHODS`).
METHOD_ORDER: tuple[str, ...] = ("oppu", "oppu+rag", "oppu+pag", "rag", "pag", "none", "oppu+profile-only",
                                 "profile-only")
METHOD_LABELS: dict[str, str] = {name: method.label for name, method in METHODS.items()}
# One fixed colour per method so a method looks the same on every page.
METHOD_COLORS: dict[str, str] = {
    "none": "#868E96",
    "rag": "#F08C00",
    "pag": "#E8590C",
    "oppu": "#4C6EF5",
    "oppu+rag": "#7048E8",
    "oppu+pag": "#2B8A3E",
    "profile-only": "#C2255C",
    "oppu+profile-only": "#1098AD",
}
HIGHLIGHT_COLOR = "#E03131"
_NEUTRAL = "#ADB5BD"


class ChartDataError(ValueError):
    """The frame handed to a builder lacks a column the chart needs."""


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def sort_methods(methods: Iterable[str]) -> list[str]:
    """Known methods in METHOD_ORDER, unknown ones after them alphabetically."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(set(methods), key=lambda m: (rank.get(m, len(rank)), m))


def _require(df: pd.DataFrame, columns: Sequence[str], chart: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ChartDataError(f"{chart}: the data has no column {', '.join(map(repr, missing))} "
                             f"(it has {', '.join(map(str, df.columns)) or 'none'})")


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.0, "xanchor": "left"},
        template="plotly_white",
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0, "title": None},
        height=380,
    )
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def has_intervals(df: pd.DataFrame) -> bool:
    return {"ci_low", "ci_high"} <= set(df.columns)


def _error_y(part: pd.DataFrame, value: str) -> dict | None:
    """Asymmetric error bars from `ci_low`/`ci_high` around column `value`; None without interval columns."""
    if not has_intervals(part):
        return None
    v = part[value].astype(float)
    return {"type": "data", "symmetric": False, "array": (part["ci_high"].astype(float) - v).clip(lower=0),
            "arrayminus": (v - part["ci_low"].astype(float)).clip(lower=0), "thickness": 1.5, "width": 5}


def _counts(part: pd.DataFrame) -> list[str]:
    """Per row, "[lo, hi] · 12 users, 71 queries" (whatever of it the row carries), for hover text."""
    users = next((c for c in ("n_users", "users") if c in part.columns), None)
    queries = next((c for c in ("n_queries", "n") if c in part.columns), None)
    out = []
    for _, row in part.iterrows():
        bits = []
        if has_intervals(part) and pd.notna(row["ci_low"]):
            bits.append(f"95% CI [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
        if users:
            bits.append(f"{int(row[users])} users")
        if queries:
            bits.append(f"{int(row[queries])} queries")
        out.append(" · ".join(bits))
    return out


def metric_title(metric: str, lower_is_better: bool = False) -> str:
    return f"{metric} ({'lower' if lower_is_better else 'higher'} is better)"


def history_histogram(sizes: pd.DataFrame, highlight_user: str | None = None, nbins: int = 30) -> go.Figure:
    """Distribution of history sizes across users (`user_id`, `history_size`); the chosen user is marked."""
    _require(sizes, ("user_id", "history_size"), "history-size histogram")
    fig = go.Figure(go.Histogram(x=sizes["history_size"], nbinsx=nbins, marker_color=_NEUTRAL,
                                 name="users", hovertemplate="%{x} items: %{y} users<extra></extra>"))
    chosen = sizes.loc[sizes["user_id"].astype(str) == str(highlight_user), "history_size"]
    if highlight_user is not None and not chosen.empty:
        n = int(chosen.iloc[0])
        fig.add_vline(x=n, line_color=HIGHLIGHT_COLOR, line_width=3,
                      annotation_text=f"user {highlight_user}: {n} items", annotation_font_color=HIGHLIGHT_COLOR)
    return _layout(fig, "History size across users", "history items per user", "users")


def loss_curve(history: pd.DataFrame) -> go.Figure:
    """Training loss against step (`step`, `loss`), one line per `user_id` when that column is present."""
    _require(history, ("step", "loss"), "loss curve")
    fig = go.Figure()
    groups = history.groupby("user_id", sort=False) if "user_id" in history.columns else [("loss", history)]
    for name, part in groups:
        part = part.sort_values("step")
        fig.add_trace(go.Scatter(x=part["step"], y=part["loss"], mode="lines+markers", name=str(name),
                                 marker={"size": 4}))
    fig.update_layout(showlegend=len(fig.data) > 1)
    return _layout(fig, "Training loss", "step", "loss")


def metric_bars(metrics: pd.DataFrame, title: str = "Metrics by method") -> go.Figure:
    """Grouped bars of `value` per `metric`, one bar colour per `method` (a run's metric table)."""
    _require(metrics, ("method", "metric", "value"), "metric bars")
    fig = go.Figure()
    for method in sort_methods(metrics["method"]):
        part = metrics[metrics["method"] == method]
        fig.add_trace(go.Bar(x=part["metric"], y=part["value"], name=method_label(method),
                             marker_color=METHOD_COLORS.get(method), error_y=_error_y(part, "value"),
                             text=part["value"].map(lambda v: f"{v:.3f}"), textposition="outside",
                             customdata=_counts(part),
                             hovertemplate="%{x}: %{y:.3f}<br>%{customdata}<extra>" + method_label(method)
                                           + "</extra>"))
    fig.update_layout(barmode="group")
    return _layout(fig, title, "metric", "value")


def method_intervals(summary: pd.DataFrame, metric: str, lower_is_better: bool = False,
                     title: str = "Mean per method with 95% intervals") -> go.Figure:
    """One bar per `method` at its `mean`, with its `ci_low`–`ci_high` interval as an error bar and the counts
    (`n_users`, `n_queries`, `n_seeds`) in the hover text (an `oppu.uncertainty` summary)."""
    _require(summary, ("method", "mean", "ci_low", "ci_high"), "method intervals")
    fig = go.Figure()
    for method in sort_methods(summary["method"]):
        part = summary[summary["method"] == method]
        seeds = int(part["n_seeds"].iloc[0]) if "n_seeds" in part.columns else 1
        fig.add_trace(go.Bar(x=[method_label(method)], y=part["mean"], name=method_label(method),
                             marker_color=METHOD_COLORS.get(method), error_y=_error_y(part, "mean"),
                             text=[f"{v:.3f}" for v in part["mean"]], textposition="outside",
                             customdata=[c + (f" · {seeds} seeds" if seeds > 1 else "") for c in _counts(part)],
                             hovertemplate="%{y:.3f}<br>%{customdata}<extra>" + method_label(method) + "</extra>"))
    fig.update_layout(showlegend=False)
    return _layout(fig, title, "method", metric_title(metric, lower_is_better))


def lines_by_method(df: pd.DataFrame, x: str, title: str, x_title: str, y_title: str,
                    x_order: Sequence | None = None) -> go.Figure:
    """One line per `method` of `score` against column `x` (shared by the activity and k-sweep figures)."""
    _require(df, (x, "method", "score"), title)
    fig = go.Figure()
    rank = {v: i for i, v in enumerate(x_order or ())}
    for method in sort_methods(df["method"]):
        part = df[df["method"] == method]
        part = part.sort_values(x, key=(lambda col: col.map(rank)) if x_order is not None else None)
        fig.add_trace(go.Scatter(x=part[x], y=part["score"], mode="lines+markers", name=method_label(method),
                                 line={"color": METHOD_COLORS.get(method), "width": 3}, marker={"size": 9},
                                 error_y=_error_y(part, "score"), customdata=_counts(part),
                                 hovertemplate="%{x}: %{y:.3f}<br>%{customdata}<extra>" + method_label(method)
                                               + "</extra>"))
    if x_order is not None:
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(x_order))
    return _layout(fig, title, x_title, y_title)


def activity_bins(df: pd.DataFrame) -> pd.DataFrame:
    """Adds `bin_label` ("12–40 items") to the store's activity rows (`bin`, `history_min`, `history_max`)."""
    _require(df, ("bin", "history_min", "history_max"), "activity bins")
    labels = df["history_min"].astype(int).astype(str) + "–" + df["history_max"].astype(int).astype(str) + " items"
    return df.assign(bin_label=labels.where(df["history_min"] != df["history_max"],
                                            df["history_min"].astype(int).astype(str) + " items"))


def activity_curve(df: pd.DataFrame, metric: str, lower_is_better: bool = False) -> go.Figure:
    """Figure 3: the score per user-activity bin (1 = least active), one line per method."""
    _require(df, ("bin", "history_min", "history_max", "method", "score"), "performance by activity level")
    labelled = activity_bins(df)
    order = list(labelled.sort_values("bin")["bin_label"].drop_duplicates())
    return lines_by_method(labelled, "bin_label", "Performance by user activity (Fig. 3)",
                           "history items per user (equal-count bins)", metric_title(metric, lower_is_better),
                           x_order=order)


def k_sweep(df: pd.DataFrame, metric: str, lower_is_better: bool = False) -> go.Figure:
    """Figure 4: the score against the number of retrieved items `k`, one line per method."""
    _require(df, ("k", "method", "score"), "k sweep")
    fig = lines_by_method(df, "k", "Number of retrieved items (Fig. 4)", "retrieved items k",
                          metric_title(metric, lower_is_better))
    fig.update_xaxes(dtick=1)
    return fig


def grouped_bars(df: pd.DataFrame, group: str, title: str, x_title: str, metric: str,
                 lower_is_better: bool = False) -> go.Figure:
    """Bars of `score` per `group` category, one colour per `method` (PEFT type, history format, shift)."""
    _require(df, (group, "method", "score"), title)
    fig = go.Figure()
    for method in sort_methods(df["method"]):
        part = df[df["method"] == method]
        fig.add_trace(go.Bar(x=part[group].astype(str), y=part["score"], name=method_label(method),
                             marker_color=METHOD_COLORS.get(method), error_y=_error_y(part, "score"),
                             text=part["score"].map(lambda v: f"{v:.3f}"), textposition="outside",
                             customdata=_counts(part),
                             hovertemplate="%{x}: %{y:.3f}<br>%{customdata}<extra>" + method_label(method)
                                           + "</extra>"))
    fig.update_layout(barmode="group")
    return _layout(fig, title, x_title, metric_title(metric, lower_is_better))


def peft_comparison(df: pd.DataFrame, metric: str, lower_is_better: bool = False) -> go.Figure:
    """The score per PEFT type (`peft`: lora, ia3, prompt), one bar colour per method."""
    return grouped_bars(df, "peft", "PEFT type", "PEFT type of the personal module", metric, lower_is_better)


def behaviour_shift(df: pd.DataFrame, metric: str, lower_is_better: bool = False) -> go.Figure:
    """The score with the full history against history cut before a date (`history_cutoff`, '' = full)."""
    _require(df, ("history_cutoff",), "behaviour shift")
    cutoff = df["history_cutoff"].fillna("").astype(str)
    labelled = df.assign(history=cutoff.map(lambda c: f"items before {c}" if c else "full history"))
    return grouped_bars(labelled, "history", "Behaviour shift", "history used for training and retrieval",
                        metric, lower_is_better)


def history_format(df: pd.DataFrame, metric: str, lower_is_better: bool = False) -> go.Figure:
    """The score with full retrieved items against text-only ones (`history_format`), one colour per method."""
    return grouped_bars(df, "history_format", "History format", "format of retrieved items", metric,
                        lower_is_better)
