"""Replicates: seeds of one config as one group of runs (`oppu.replicates`, `oppu run --seeds`), the store's seed
column (new files and schema-2 files upgraded in place) and `oppu results --group/--run` intervals."""

from __future__ import annotations

import json

import duckdb
import pytest

from oppu.__main__ import main
from oppu.config import ConfigError, RunConfig, build_config
from oppu.replicates import parse_seeds, seed_configs
from oppu.store import SCHEMA_VERSION, Store


def test_parse_seeds():
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    assert parse_seeds([3, 4]) == [3, 4]
    for bad, what in (("0,x", "not an integer"), ("1,1", "repeated"), ("", "no seeds"), ("-1", "negative")):
        with pytest.raises(ConfigError, match=what):
            parse_seeds(bad)


def test_seed_configs_vary_the_personal_seeds_and_share_the_base():
    base = build_config("quick", {"adaptation_train.seed": 7})
    configs = seed_configs(base, [0, 1, 2])
    assert [c.user_train.seed for c in configs] == [0, 1, 2]
    assert [c.generation.seed for c in configs] == [0, 1, 2]
    assert {c.adaptation_train.seed for c in configs} == {7}  # one task-adapted base for every seed
    assert len({c.seed_group for c in configs}) == 1 and configs[0].seed_group
    # apart from the seeds, each replicate is the config it came from
    strip = {"user_train": None, "generation": None, "seed_group": None}
    assert all({**c.to_dict(), **strip} == {**base.to_dict(), **strip} for c in configs)
    assert RunConfig.from_dict(configs[1].to_dict()) == configs[1]  # the stored config reads back
    assert seed_configs(base, [5], group="g1")[0].seed_group == "g1"


def _prediction(run_id: str, user: str, query: str, method: str, right: bool) -> dict:
    gold = "comedy"
    return {"run_id": run_id, "task": "LaMP_2M", "user_id": user, "query_id": query, "method": method, "k": 0,
            "peft": "", "retriever": "", "prompt": "p", "raw_output": gold if right else "war",
            "output": gold if right else "war", "gold": gold, "retrieved_ids": [], "retrieved_scores": [],
            "history_size": 3}


def test_every_row_carries_its_runs_seed_and_groups_read_back(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    for seed in (3, 4):
        run_id = f"r{seed}"
        store.create_run(run_id, {"task": "LaMP_2M", "user_train": {"seed": seed}, "seed_group": "g"}, "LaMP_2M",
                         "m", "f", "v")
        store.add_predictions([_prediction(run_id, u, f"{u}-q{j}", m, right=(m == "oppu") or j == seed % 2)
                               for u in ("a", "b", "c") for j in range(2) for m in ("none", "oppu")])
        store.add_user_metrics(run_id, "a", "none", {"accuracy": 1.0}, 3)
        store.finish_run(run_id, store.compute_run_metrics(run_id))
    store.create_run("single", {"task": "LaMP_2M"}, "LaMP_2M", "m", "f", "v")
    store.add_predictions([_prediction("single", "a", "a-q0", "none", True)])
    con = duckdb.connect(str(store.path), read_only=True)
    for table in ("predictions", "user_metrics", "run_metrics"):
        seeds = dict(con.execute(f"SELECT run_id, min(seed) FROM {table} GROUP BY run_id").fetchall())
        assert seeds["r3"] == 3 and seeds["r4"] == 4, table
    con.close()
    assert list(store.group_runs("g")["seed"]) == [3, 4]
    assert store.run_group("r3") == "g" and store.run_group("single") == ""
    groups = store.seed_groups()
    assert list(groups["seed_group"]) == ["g"] and list(groups["seeds"].iloc[0]) == [3, 4]
    scores = store.scores(["r3", "r4"])
    assert len(scores) == 24 and set(scores["seed"]) == {3, 4}
    assert set(scores.columns) >= {"user_id", "query_id", "method", "seed", "score"}

    from oppu.uncertainty import uncertainty

    result = uncertainty(store, ["r3", "r4"])
    assert result["seeds"] == [3, 4] and result["settings"]["reference"] == "none"
    oppu_row = next(r for r in result["summary"] if r["method"] == "oppu")
    assert oppu_row["mean"] == 1.0 and oppu_row["n_seeds"] == 2 and oppu_row["n_users"] == 3
    diff = result["differences"][0]
    assert diff["method_a"] == "oppu" and diff["wins"] == 6 and diff["ties"] == 6 and diff["losses"] == 0


SCHEMA_2 = (
    "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, created TIMESTAMP, finished TIMESTAMP, status VARCHAR,
        task VARCHAR, model VARCHAR, tag VARCHAR, job_id VARCHAR, config JSON, data_fingerprint VARCHAR,
        code_version VARCHAR)""",
    """CREATE TABLE predictions (run_id VARCHAR, task VARCHAR, user_id VARCHAR, query_id VARCHAR, method VARCHAR,
        k INTEGER, peft VARCHAR, retriever VARCHAR, prompt VARCHAR, raw_output VARCHAR, output VARCHAR,
        gold VARCHAR, retrieved_ids VARCHAR[], retrieved_scores DOUBLE[], history_size INTEGER, correct DOUBLE,
        created TIMESTAMP, lenient_output VARCHAR, lenient_correct DOUBLE)""",
    """CREATE TABLE user_metrics (run_id VARCHAR, user_id VARCHAR, method VARCHAR, metric VARCHAR, value DOUBLE,
        history_size INTEGER, created TIMESTAMP)""",
    "CREATE TABLE run_metrics (run_id VARCHAR, method VARCHAR, metric VARCHAR, value DOUBLE)",
    """CREATE TABLE train_curves (run_id VARCHAR, user_id VARCHAR, stage VARCHAR, step INTEGER, loss DOUBLE,
        created TIMESTAMP)""",
)


def test_a_schema_2_file_gets_the_seed_of_each_run(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    for statement in SCHEMA_2:
        con.execute(statement)
    con.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    con.execute("""INSERT INTO runs (run_id, task, status, config) VALUES
                   ('seeded', 'LaMP_2M', 'done', '{"user_train": {"seed": 5}}'), ('plain', 'LaMP_2M', 'done', '{}')""")
    for run_id in ("seeded", "plain", "orphan"):
        con.execute("INSERT INTO predictions (run_id, task, user_id, query_id, method, output, gold, correct) "
                    "VALUES (?, 'LaMP_2M', 'u', 'q', 'none', 'comedy', 'comedy', 1.0)", [run_id])
        con.execute("INSERT INTO user_metrics VALUES (?, 'u', 'none', 'accuracy', 1.0, 3, NULL)", [run_id])
        con.execute("INSERT INTO run_metrics VALUES (?, 'none', 'accuracy', 1.0)", [run_id])
    con.close()
    store = Store(path)
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    for table in ("predictions", "user_metrics", "run_metrics"):
        seeds = dict(con.execute(f"SELECT run_id, seed FROM {table}").fetchall())
        assert seeds == {"seeded": 5, "plain": 0, "orphan": 0}, table
    con.close()
    assert list(store.scores(["seeded"])["seed"]) == [5]
    store.add_user_metrics("seeded", "u2", "none", {"accuracy": 0.0}, 2)  # writes still work after the upgrade
    assert len(store.user_metrics("seeded")) == 2


@pytest.fixture()
def cli_paths(tiny_model_dir, tiny_data_dir, tmp_path):
    return {"model": str(tiny_model_dir), "data": str(tiny_data_dir), "db": str(tmp_path / "r.duckdb"),
            "artifacts": str(tmp_path / "art")}


def test_run_seeds_then_results_by_group_and_run(cli_paths, capsys, tmp_path, monkeypatch):
    import oppu.profiles

    monkeypatch.setattr(oppu.profiles, "PROFILE_MAX_NEW_TOKENS", 4)
    p = cli_paths
    args = ["run", "--task", "LaMP_2M", "--methods", "none,oppu", "--model", p["model"], "--data", p["data"],
            "--db", p["db"], "--artifacts", p["artifacts"], "--epochs", "1", "--user-ids", "alice,bob",
            "--quiet", "--seeds", "0,1"]
    # the task adaptation is made tiny through the preset-free overrides of build_config: a short bounded loop
    monkeypatch.setattr("oppu.commands.run.config_from_args", _tiny_adaptation(__import__(
        "oppu.commands.run", fromlist=["config_from_args"]).config_from_args))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "seed 0: run" in out and "seed 1: run" in out and "seed group" in out
    assert "wins/ties/losses" in out and "seeds 0, 1" in out

    store = Store(p["db"])
    groups = store.seed_groups()
    assert len(groups) == 1
    group = groups["seed_group"].iloc[0]
    runs = store.group_runs(group)
    assert list(runs["seed"]) == [0, 1] and set(runs["status"]) == {"done"}
    configs = {r.run_id: json.loads(r.config) for r in store.runs().itertuples()}
    stored = [configs[r] for r in runs["run_id"]]
    assert [c["user_train"]["seed"] for c in stored] == [0, 1] and [c["generation"]["seed"] for c in stored] == [0, 1]
    assert {c["adaptation_train"]["seed"] for c in stored} == {0} and {c["seed_group"] for c in stored} == {group}
    # one task-adapted base, trained by the first seed and reused by the second
    task_adapters = [f for f in (tmp_path / "art" / "task_adapters").rglob("adapter_config.json")]
    assert len(task_adapters) == 1
    # the adapters differ by seed: different initial draws give different final losses
    curves = [store.train_curve(r) for r in runs["run_id"]]
    losses = [c[c.stage.str.startswith("oppu")]["loss"].tolist() for c in curves]
    assert losses[0] != losses[1]

    assert main(["results", "--db", p["db"], "--group", group, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seeds"] == [0, 1] and len(result["runs"]) == 2 and result["group"] == group
    assert {r["n_seeds"] for r in result["summary"]} == {2}
    assert [d["method_a"] for d in result["differences"]] == ["oppu"]

    assert main(["results", "--db", p["db"], "--run", runs["run_id"].iloc[0], "--reference", "oppu"]) == 0
    out = capsys.readouterr().out
    assert f"seed group {group}" in out and "difference from OPPU" in out and "Non-personalized" in out

    assert main(["results", "--db", p["db"]]) == 0
    listing = capsys.readouterr().out
    assert f"seed 0 of group {group}" in listing and f"seed 1 of group {group}" in listing
    assert "--group GROUP" in listing

    assert main(["results", "--db", p["db"], "--group", "nope"]) == 2
    assert "no seed group 'nope'" in capsys.readouterr().err
    assert main(["results", "--db", p["db"], "--group", group, "--reference", "rag"]) == 2
    assert "reference method 'rag'" in capsys.readouterr().err


def _tiny_adaptation(config_from_args):
    def build(args):
        cfg = config_from_args(args)
        return cfg.replace(adaptation_train=cfg.adaptation_train.__class__(
            epochs=1, lr=1e-2, batch_size=8, max_length=128, max_examples=8))
    return build


def test_run_seeds_refuses_bad_seeds_and_a_resume(tmp_path, capsys):
    base = ["run", "--task", "LaMP_2M", "--db", str(tmp_path / "r.duckdb"), "--quiet"]
    assert main([*base, "--seeds", "0,0"]) == 2
    assert "seed 0 is repeated" in capsys.readouterr().err
    assert main([*base, "--seeds", "0,1", "--run-id", "some-run"]) == 2
    assert "--run-id resumes one run" in capsys.readouterr().err
