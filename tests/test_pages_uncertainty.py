"""The dashboard's uncertainty display under AppTest: intervals and key differences on Overview and Compare
(pooled over a seed group's runs), Compare's two-method wins/ties/losses filter, and error bars with counts on
every Analyses figure. The store is the one `test_pages.populate` writes (OPPU always right, RAG right on every
other query, the non-personalized row never)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pages import LABELS, page, plotly_charts, populate, texts, values


@pytest.fixture()
def populated(env, tiny_task_data):
    populate(Path(env["OPPU_DB"]), tiny_task_data)
    return env


def _error_bars(trace) -> tuple[list, list]:
    return values(trace.error_y.array), values(trace.error_y.arrayminus)


def test_overview_shows_intervals_and_key_differences(populated):
    at = page("overview")
    assert not at.exception and not at.error
    table = at.table[0].value
    assert set(table["method"]) == set(LABELS.values())
    assert list(table.columns) == ["method", "mean", "95% CI", "users", "queries", "seeds"]
    assert set(table["users"]) == {3} and set(table["seeds"]) == {1}
    shown = texts(at)
    assert "OPPU vs RAG: +" in shown and "wins/ties/losses" in shown and "p=" in shown
    intervals = plotly_charts(at)[1]
    assert intervals.layout.title.text == "Mean per method with 95% intervals"
    oppu = next(t for t in intervals.data if t.name == LABELS["oppu"])
    assert list(values(oppu.y)) == [1.0]  # always right: a degenerate interval at 1
    rag = next(t for t in intervals.data if t.name == LABELS["rag"])
    up, down = _error_bars(rag)
    assert up[0] > 0 and down[0] > 0 and "users" in rag.customdata[0]


def test_a_seed_group_is_pooled_on_overview_and_compare(env, tiny_task_data):
    from oppu.store import Store

    db = Path(env["OPPU_DB"])
    populate(db, tiny_task_data)
    for seed, run_id in ((0, "seed-0"), (1, "seed-1")):
        # the run's config (with its seed and group) is recorded first, as run_experiment does
        Store(db).create_run(run_id, {"task": "LaMP_2M", "methods": ["none", "rag", "oppu", "oppu+rag"],
                                      "seed_group": "g1", "user_train": {"seed": seed}}, "LaMP_2M", "tiny", "f", "t")
        populate(db, tiny_task_data, run_id=run_id)
    at = page("overview")
    at.selectbox(key="overview-run").set_value("seed-1").run()
    assert not at.exception and not at.error
    assert "the 2 seeds of group `g1`" in texts(at)
    assert set(at.table[0].value["seeds"]) == {2}
    compare = page("compare", run="seed-0", user="alice")
    assert not compare.exception and not compare.error
    assert set(compare.table[0].value["seeds"]) == {2}


def test_compare_counts_wins_ties_losses_and_filters_the_table(populated, tiny_task_data):
    alice = [q.id for q in tiny_task_data.user("alice").queries]
    at = page("compare", user="alice")
    assert at.selectbox(key="compare-a").value == "oppu" and at.selectbox(key="compare-b").value == "rag"
    assert set(at.table[0].value["method"]) == set(LABELS.values())
    # alice's first query: both right (a tie); her second: only OPPU right
    assert "OPPU better on 1, tie on 1, RAG better on 0 queries" in texts(at)
    assert "Every user of the run: OPPU vs RAG: +" in texts(at)
    at.segmented_control(key="compare-outcome").set_value("tie").run()
    assert list(at.dataframe[0].value["query"]) == alice[:1]
    at.segmented_control(key="compare-outcome").set_value("a").run()
    assert list(at.dataframe[0].value["query"]) == alice[1:]
    at.segmented_control(key="compare-outcome").set_value("b").run()
    assert "No query of this user where RAG better" in texts(at)
    at.selectbox(key="compare-b").set_value("none").run()
    at.segmented_control(key="compare-outcome").set_value("a").run()
    assert list(at.dataframe[0].value["query"]) == alice
    at.segmented_control(key="compare-outcome").set_value("all").run()
    assert list(at.dataframe[0].value["query"]) == alice and not at.exception


def test_every_analysis_figure_has_error_bars_and_counts(populated, tiny_task_data):
    populate(Path(populated["OPPU_DB"]), tiny_task_data, run_id="run-k4", k=4)
    at = page("analyses")
    assert not at.exception and not at.error
    charts = plotly_charts(at)
    assert len(charts) == 5
    for fig in charts:
        for trace in fig.data:
            up, down = _error_bars(trace)
            assert len(up) == len(values(trace.y)) and all(u >= 0 for u in up) and all(d >= 0 for d in down)
            assert all("users" in c and "queries" in c for c in trace.customdata), fig.layout.title.text
    k_fig = charts[1]
    rag = next(t for t in k_fig.data if t.name == LABELS["rag"])
    assert sorted(values(rag.x)) == [1, 4] and max(_error_bars(rag)[0]) > 0
    assert "Error bars: 95% intervals" in texts(at) and "users and" in texts(at)
