"""The `oppu run / sweep / results / adapters / prepare` commands, in-process through `oppu.__main__.main`."""

from __future__ import annotations

import json
import zipfile

import pytest

from oppu.__main__ import main


@pytest.fixture()
def cli_paths(tiny_model_dir, tiny_data_dir, tmp_path):
    return {"model": str(tiny_model_dir), "data": str(tiny_data_dir), "db": str(tmp_path / "r.duckdb"),
            "artifacts": str(tmp_path / "art")}


def _run_args(p, *extra):
    return ["run", "--task", "LaMP_2M", "--methods", "none,oppu", "--model", p["model"], "--data", p["data"],
            "--db", p["db"], "--artifacts", p["artifacts"], "--epochs", "1", "--no-adapt", "--quiet", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_run_prints_a_metric_table_then_results_and_adapters_work(cli_paths, capsys, tmp_path):
    assert main(_run_args(cli_paths, "--user-ids", "alice,bob")) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "none" in out and "oppu" in out and "done" in out
    run_id = out.split()[1]

    assert main(["results", "--db", cli_paths["db"], "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert runs[0]["run_id"] == run_id and set(runs[0]["metrics"]) == {"none", "oppu"}
    assert runs[0]["users"] == 2

    art = ["adapters", "--artifacts", cli_paths["artifacts"]]
    assert main([*art, "list"]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "bob" in listing

    zip_path = tmp_path / "alice.zip"
    assert main([*art, "export", "alice", "--out", str(zip_path)]) == 0
    names = zipfile.ZipFile(zip_path).namelist()
    assert names and all(n.startswith("alice/") for n in names)  # only alice's folder
    assert "alice/plain/adapter_model.safetensors" in names and "alice/plain/manifest.json" in names

    assert main([*art, "delete", "alice"]) == 0
    capsys.readouterr()
    assert main([*art, "list"]) == 0
    listing = capsys.readouterr().out
    assert "alice" not in listing and "bob" in listing
    assert main([*art, "import", str(zip_path)]) == 0
    assert main([*art, "list"]) == 0
    assert "alice" in capsys.readouterr().out


def test_import_rejects_path_traversal(cli_paths, tmp_path, capsys):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("alice/plain/manifest.json", "{}")
        archive.writestr("../../escape.txt", "x")
    assert main(["adapters", "--artifacts", cli_paths["artifacts"], "import", str(evil)]) == 2
    assert "outside" in _one_error_line(capsys)
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("--task", "LaMP_9", "unknown task"),
    ("--user-ids", "nobody", "nobody"),
    ("--data", "/nonexistent/folder", "LaMP_2M"),
    ("--methods", "none,magic", "unknown method"),
    ("--preset", "huge", "unknown preset"),
    ("--batching", "magic", "batching: use multi_lora or per_user"),
])
def test_bad_input_is_one_line_and_exit_2(cli_paths, capsys, flag, value, expected):
    args = _run_args(cli_paths)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    assert expected in _one_error_line(capsys)


def test_presets_and_flags_layer(cli_paths):
    import argparse

    from oppu.commands import run as run_cmd

    parser = argparse.ArgumentParser()
    run_cmd.configure(parser)
    cfg = run_cmd.config_from_args(parser.parse_args(["--preset", "paper", "--k", "3", "--rank", "4"]))
    assert cfg.users == 100 and cfg.user_train.lr == 1e-4 and cfg.adaptation_train.max_length == 2048
    # --rank alone keeps alpha = r (LoRA scaling 1, the paper's r = alpha = 8), as the Train form does.
    assert cfg.retrieval.k == 3 and cfg.user_peft.r == 4 and cfg.user_peft.alpha == 4
    both = run_cmd.config_from_args(parser.parse_args(["--rank", "4", "--alpha", "16"]))
    assert both.user_peft.r == 4 and both.user_peft.alpha == 16
    plain = run_cmd.config_from_args(parser.parse_args([]))
    from oppu.config import RunConfig

    assert plain == RunConfig() and plain.batching == "multi_lora"
    assert run_cmd.config_from_args(parser.parse_args(["--batching", "per_user"])).batching == "per_user"
    assert run_cmd.config_from_args(parser.parse_args(["--dtype", "bfloat16"])).model.dtype == "bfloat16"


def test_sweep_dry_run_lists_the_runs(cli_paths, capsys):
    assert main(["sweep", "--kind", "k", "--values", "0,2", "--dry-run", "--data", cli_paths["data"]]) == 0
    out = capsys.readouterr().out
    assert "[1/2] k=0:" in out and "[2/2] k=2:" in out and "'retrieval.k': 2" in out
    assert main(["sweep", "--kind", "k", "--values", "0,2", "--seeds", "0,1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[2/4] k=0 · seed 1: {'user_train.seed': 1, 'retrieval.k': 0, 'generation.seed': 1, 'tag': 'k-sweep'}" \
        in out
    assert "[4/4] k=2 · seed 1:" in out and "seed_group" not in out
    assert main(["sweep", "--kind", "bogus", "--dry-run"]) == 2
    assert "unknown sweep" in _one_error_line(capsys)
    assert main(["sweep", "--kind", "k", "--seeds", "1,1", "--dry-run"]) == 2
    assert "seed 1 is repeated" in _one_error_line(capsys)


def _sweep_args(p, *extra):
    return ["sweep", "--kind", "k", "--values", "0,2", "--task", "LaMP_2M", "--methods", "rag,oppu+rag",
            "--model", p["model"], "--data", p["data"], "--db", p["db"], "--artifacts", p["artifacts"],
            "--epochs", "1", "--no-adapt", "--user-ids", "alice,bob", "--quiet", *extra]


def test_a_sweep_with_seeds_runs_each_member_per_seed_and_the_analysis_pools_them(cli_paths, capsys):
    from oppu.analyses import comparable_runs
    from oppu.store import Store

    assert main(_sweep_args(cli_paths, "--seeds", "0,1")) == 0
    out = capsys.readouterr().out
    assert "[4/4] k=2 · seed 1:" in out and out.count("seed group ") == 2
    store = Store(cli_paths["db"])
    groups = store.seed_groups()
    assert len(groups) == 2 and [list(s) for s in groups["seeds"]] == [[0, 1], [0, 1]]
    assert set(store.runs()["status"]) == {"done"}
    used = comparable_runs("k", store.runs().to_dict("records"))
    assert {value: len(runs) for value, runs in used.settings().items()} == {"k=0": 2, "k=2": 2}
    assert not used.excluded
    # the seeds of one setting are the runs of one seed group, and each setting has its own
    groups = {value: {store.run_group(r) for r in runs} for value, runs in used.settings().items()}
    assert {len(g) for g in groups.values()} == {1} and groups["k=0"] != groups["k=2"]


def test_a_sweep_with_seeds_in_the_background_is_one_group_of_jobs(cli_paths, capsys, tmp_path, monkeypatch):
    from oppu import jobs
    from oppu.jobs import lifecycle

    monkeypatch.setattr(lifecycle, "_spawn", lambda root, job: None)  # jobs stay queued: nothing trains here
    root = tmp_path / "jobs"
    assert main(_sweep_args(cli_paths, "--seeds", "0,1,2", "--background", "--root", str(root))) == 0
    assert "6 jobs queued" in capsys.readouterr().out
    listed = jobs.list_jobs(root)
    (sweep,) = jobs.group_sweeps(listed)
    assert sweep["kind"] == "k" and sweep["planned"] == 6 and sweep["queued"] == 6
    labels = {j["sweep"]["label"]: j["config"] for j in listed}
    assert sorted(labels) == [f"k={k} · seed {s}" for k in (0, 2) for s in (0, 1, 2)]
    assert labels["k=2 · seed 1"]["user_train"]["seed"] == 1 and labels["k=2 · seed 1"]["generation"]["seed"] == 1
    assert labels["k=2 · seed 1"]["retrieval"]["k"] == 2
    groups = {k: {labels[f"k={k} · seed {s}"]["seed_group"] for s in (0, 1, 2)} for k in (0, 2)}
    assert all(len(g) == 1 and "" not in g for g in groups.values()) and groups[0] != groups[2]


def test_results_without_a_store_is_a_clear_error(tmp_path, capsys):
    assert main(["results", "--db", str(tmp_path / "none.duckdb")]) == 2
    assert "oppu run" in _one_error_line(capsys)
