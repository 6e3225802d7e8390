"""`oppu report --preset tiny` on the tiny model and tiny data: every run lands in the store, and one HTML file
holds every section, a figure per analysis, intervals, the command, the configs and run ids, the machine and the
statement that nothing was tuned."""

from __future__ import annotations

import re

import pytest

from oppu.report import REPORT_PRESETS, SECTIONS, TUNING_STATEMENT, build_report, findings, plan, users_to_run


@pytest.fixture(autouse=True)
def short_profiles(monkeypatch):
    """The tiny random model never ends a turn, so PAG profiles would always run to their full budget."""
    import oppu.profiles

    monkeypatch.setattr(oppu.profiles, "PROFILE_MAX_NEW_TOKENS", 4)


@pytest.fixture()
def overrides(tiny_model_dir, tiny_data_dir, tmp_path):
    return {"model.name": str(tiny_model_dir), "model.device": "cpu", "data_dir": str(tiny_data_dir),
            "db": str(tmp_path / "r.duckdb"), "artifacts_dir": str(tmp_path / "art")}


def test_the_plan_covers_every_section_and_says_what_it_skips(overrides):
    runs, notes = plan(REPORT_PRESETS["tiny"], overrides)
    assert {r.section for r in runs} == set(SECTIONS)
    assert [r.task for r in runs if r.section == "main"] == ["LaMP_2M"]  # the only task with data here
    assert sum("skipped LaMP_" in n for n in notes) == 6 + 1  # six main-table tasks and LaMP_7's Fig. 3
    assert all(r.cfg.db == overrides["db"] for r in runs)
    # the k=1, full-history, full-format and LoRA points are the main table's own run: not run twice
    assert users_to_run(runs, (0,)) < sum(r.cfg.users for r in runs)


def test_tiny_report_writes_one_html_with_every_section(overrides, tmp_path):
    from oppu.__main__ import main  # noqa: F401 - the command is registered
    from oppu.store import Store

    lines = []
    path = build_report("tiny", tmp_path / "out" / "report.html", overrides, command="oppu report --preset tiny",
                        progress=False, log=lines.append, markdown=tmp_path / "RESULTS.md")
    page = path.read_text()
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Findings" in md and "OPPU vs Non-personalized" in md and "OPPU vs RAG" in md
    assert re.search(r"\| [+-]\d\.\d{3} \| \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] \|", md)  # a paired difference, its CI
    for section in SECTIONS.values():
        assert f"## {section}" in md, section
    assert "oppu report --preset tiny" in md and "`report.html`" in md
    assert "most common answer (share)" in md and "most common answer (share)" in page
    for section in (*SECTIONS, "command", "tuning", "machine", "findings", "notes", "provenance"):
        assert f"id='{section}'" in page, section
    assert TUNING_STATEMENT in page and TUNING_STATEMENT in lines
    assert "oppu report --preset tiny" in page and "Wall time" in page and "python" in page
    # plotly.js inlined once, nothing fetched from the network
    assert page.count("plotly.js v") >= 1 and "<script src=" not in page and "<link" not in page
    figures = re.findall(r'<div id="(fig-[^"]+)"', page)
    assert sorted(figures) == sorted(["fig-activity-LaMP_2M", "fig-k-LaMP_2M", "fig-behaviour-shift-LaMP_2M",
                                      "fig-history-format-LaMP_2M", "fig-peft-LaMP_2M"])
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", page)  # a mean with its interval
    assert "OPPU vs Non-personalized" in page and "wins" in page
    store = Store(overrides["db"])
    runs = store.runs()
    assert set(runs["status"]) == {"done"} and runs["tag"].str.startswith("report:").all()
    for run_id in runs["run_id"]:
        assert run_id in page  # every run's id, next to its config
    assert '"user_train"' in page  # the configs themselves
    assert any("reuses the answers" in line for line in lines)

    # run again on the same store (after a kill, or to re-render): nothing is trained again, the same runs are read
    again = []
    build_report("tiny", tmp_path / "again.html", overrides, command="oppu report --preset tiny", progress=False,
                 log=again.append, markdown=tmp_path / "again.md")
    assert len(Store(overrides["db"]).runs()) == len(runs)
    assert any("already in the store" in line for line in again)
    assert "had finished in the store before it" in (tmp_path / "again.md").read_text()


def test_report_command_dry_run_and_bad_preset(overrides, capsys):
    from oppu.__main__ import main

    args = ["report", "--preset", "tiny", "--dry-run", "--data", overrides["data_dir"], "--db", overrides["db"]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "user trainings" in out and "k=2" in out and "note: " in out
    assert re.search(r"estimate: \d+ task-adaptation steps, \d+ user-training steps, \d+ answers", out)
    with pytest.raises(SystemExit):
        main(["report", "--preset", "huge"])


def test_progress_bar_counts_users_across_runs_and_shows_time_left(capsys):
    from oppu.report import ReportProgress

    bar = ReportProgress(10)
    bar.start("[1/2] main LaMP_2M")
    bar("user:alice:plain", 3, 12, 0.5)
    bar("users", 1, 2, None)
    assert bar.bar.n == 1
    bar.finish_run(2)
    bar.start("[2/2] k LaMP_2M k=2")
    bar("users", 3, 4, None)
    assert bar.bar.n == 5
    bar("users", 4, 4, None)
    bar("users", 0, 4, None)  # the same run's next seed reports its users from 0 again
    bar("users", 1, 4, None)
    assert bar.bar.n == 2 + 4 + 1
    bar.write("a line above the bar")
    bar.close()
    err = capsys.readouterr().err
    assert "7/10 users" in err and "<" in err and "a line above the bar" in err  # elapsed<remaining


def test_the_demo_preset_has_the_sizes_the_claims_need(overrides):
    """At least 12 users and 3 seeds on LaMP_2M, LaMP_3 and LaMP_7 for the main table; the analyses run smaller
    (their own users and one seed), and Fig. 3 reuses the main table's runs."""
    preset = REPORT_PRESETS["demo"]
    runs, _ = plan(preset, {"db": overrides["db"], "artifacts_dir": overrides["artifacts_dir"]})
    main = {r.task: r for r in runs if r.section == "main"}
    assert {"LaMP_2M", "LaMP_3", "LaMP_7"} <= set(main) and len(preset.seeds) >= 3
    assert all(r.cfg.users >= 12 and not r.seeds for r in main.values())
    analyses = [r for r in runs if r.section not in ("main", "activity")]
    assert analyses and all(r.seeds == (0,) and r.cfg.users == preset.analysis_users for r in analyses)
    assert [r.cfg.history_cutoff for r in runs if r.section == "behaviour-shift"] == [None, "2021-07-01"]
    # Fig. 3 trains nobody of its own: it is drawn from the main table's runs
    assert users_to_run(runs, preset.seeds) == users_to_run([r for r in runs if r.section != "activity"],
                                                            preset.seeds)


def _difference(a, b, diff, lo, hi):
    return {"method_a": a, "method_b": b, "label_a": a, "label_b": b, "diff": diff, "ci_low": lo, "ci_high": hi,
            "p_value": 0.01, "wins": 1, "ties": 0, "losses": 0}


@pytest.mark.parametrize("lower", [False, True])
def test_a_claim_holds_only_when_its_whole_interval_is_on_the_better_side(lower):
    sign = -1 if lower else 1
    key = [_difference("oppu", "none", sign * 0.2, *sorted((sign * 0.1, sign * 0.3))),      # wholly better
           _difference("oppu+rag", "rag", sign * 0.1, *sorted((sign * -0.05, sign * 0.2))),  # straddles zero
           _difference("oppu+pag", "pag", sign * -0.2, *sorted((sign * -0.3, sign * -0.1))),  # wholly worse
           _difference("oppu", "rag", sign * -0.2, *sorted((sign * -0.3, sign * -0.1)))]
    table = {"task": "LaMP_3" if lower else "LaMP_2M", "key": key,
             "result": {"metric": "absolute error" if lower else "accuracy", "lower_is_better": lower}}
    verdicts = {(f["method_a"], f["method_b"]): f["verdict"] for f in findings([table])}
    assert verdicts == {("oppu", "none"): "holds", ("oppu+rag", "rag"): "not shown",
                        ("oppu+pag", "pag"): "not shown", ("oppu", "rag"): "worse"}
    assert findings([{"task": "LaMP_2M", "result": None}]) == []


def test_a_run_is_reused_by_any_earlier_run_that_answered_all_its_methods():
    """Not only by the latest one of the same config: k=1 (rag, oppu+rag), then the full-history point of the
    behaviour shift (none, oppu, oppu+rag), then the LoRA point of the PEFT analysis (oppu) and the full format
    (rag, oppu+rag): the last two run nothing."""
    from oppu.config import RunConfig
    from oppu.report import PlannedRun

    cfg = RunConfig(users=4)
    runs = [PlannedRun(section, "LaMP_2M", label, cfg.replace(methods=methods, tag=f"report:{section}"))
            for section, label, methods in (("k", "k=1", ("rag", "oppu+rag")),
                                            ("behaviour-shift", "full history", ("none", "oppu", "oppu+rag")),
                                            ("peft", "lora", ("oppu",)), ("history-format", "full", ("rag", "oppu+rag")))]
    assert users_to_run(runs, (0, 1)) == 2 * 4 * 2
