"""run_experiment end to end on a tiny Llama and tiny in-test data: every method, resume, stop, privacy, cutoff."""

from __future__ import annotations

import json

import pytest
import torch

from oppu.config import METHODS, GenerationConfig, ModelConfig, PeftConfig, RunConfig, TrainConfig
from oppu.experiment import adapter_folder, adapter_styles, method_style, run_experiment
from oppu.manifest import read_manifest
from oppu.model import adapter_complete
from oppu.store import Store

FAST_USER = TrainConfig(epochs=1, lr=1e-2, batch_size=4, max_length=128)
FAST_ADAPT = TrainConfig(epochs=1, lr=1e-2, batch_size=8, max_length=128, max_examples=12)


@pytest.fixture(autouse=True)
def short_profiles(monkeypatch):
    """The tiny random model never ends a turn, so profiles would always run to their full budget."""
    import oppu.profiles

    monkeypatch.setattr(oppu.profiles, "PROFILE_MAX_NEW_TOKENS", 4)


@pytest.fixture()
def base_cfg(tiny_model_dir, tiny_data_dir, tmp_path):
    return RunConfig(task="LaMP_2M", methods=("none", "oppu"), users=2, data_dir=str(tiny_data_dir),
                     db=str(tmp_path / "r.duckdb"), artifacts_dir=str(tmp_path / "art"),
                     model=ModelConfig(name=str(tiny_model_dir), device="cpu"), adaptation_train=FAST_ADAPT,
                     user_train=FAST_USER, generation=GenerationConfig(max_new_tokens=3, batch_size=8))


def test_every_method_runs_and_is_stored(base_cfg, tiny_users):
    cfg = base_cfg.replace(methods=tuple(METHODS))
    events = []
    run_id = run_experiment(cfg, progress=lambda *a: events.append(a))
    store = Store(cfg.db)
    runs = store.runs()
    assert runs.loc[runs.run_id == run_id, "status"].item() == "done"
    preds = store.predictions_for(run_id, "alice")
    assert len(preds) == len(METHODS) * 2  # 2 queries x every method
    assert set(preds["method"]) == set(METHODS)
    metrics = store.run_metrics(run_id)
    assert set(metrics["method"]) == set(METHODS)
    _, test = tiny_users
    top2 = sorted(test, key=lambda u: -len(u.history))[:2]
    assert store.done_users(run_id) == {u.id for u in top2}
    # one adapter per user and prompt style: plain, rag, pag, rag+pag
    assert sorted(s.key for s in adapter_styles(cfg)) == ["pag", "plain", "rag", "rag+pag"]
    for user in top2:
        for style in adapter_styles(cfg):
            folder = adapter_folder(cfg, run_id, user.id, style)
            assert adapter_complete(folder)
            manifest = read_manifest(folder)
            assert manifest["item_ids"] and all(i.startswith(f"{user.id}-") for i in manifest["item_ids"])
            assert manifest["item_count"] == len(user.history) and manifest["style"] == style.key
            assert cfg.artifacts_dir not in json.dumps(manifest)  # no absolute paths in what travels
    rag = preds[preds.method == "rag"]
    assert all(len(ids) == 1 for ids in rag["retrieved_ids"])  # k=1 by default
    assert all(len(ids) == 0 for ids in preds[preds.method == "oppu"]["retrieved_ids"])
    assert all("User profile:" in p for p in preds[preds.method == "pag"]["prompt"])
    stages = {e[0] for e in events}
    # One task-adapted base per prompt style the run asks in (task_LoRA.py trains k=0, k=1, k=1+profile apart).
    assert {f"adapt:LaMP_2M:{key}" for key in ("plain", "rag", "pag", "rag+pag")} <= stages
    assert "users" in stages and any(s.startswith("user:alice:") for s in stages)
    assert events[-1] == ("users", 2, 2, None)


def test_gold_never_reaches_a_prompt(tiny_model_dir, tmp_path):
    from oppu.data import Item, Query, User, write_oppu

    def user(uid, n):
        history = tuple(Item(f"{uid}-{i}", {"text": f"article {i} about rivers", "title": f"river news {i}"},
                             f"2020-01-{i + 1:02d}") for i in range(n))
        queries = (Query(f"{uid}-q", "Generate a headline for the following article: rivers again",
                         gold=f"SECRETGOLD{uid}", date="2021-01-01"),)
        return User(uid, history, queries)

    write_oppu("LaMP_4", [user("o1", 4)], [user("u1", 5), user("u2", 4)], tmp_path / "data")
    cfg = RunConfig(task="LaMP_4", methods=tuple(METHODS), users=2, data_dir=str(tmp_path / "data"),
                    db=str(tmp_path / "r.duckdb"), artifacts_dir=str(tmp_path / "art"),
                    model=ModelConfig(name=str(tiny_model_dir), device="cpu"), adaptation_train=FAST_ADAPT,
                    user_train=FAST_USER, generation=GenerationConfig(max_new_tokens=3))
    run_id = run_experiment(cfg)
    store = Store(cfg.db)
    for uid in ("u1", "u2"):
        preds = store.predictions_for(run_id, uid)
        assert len(preds) == len(METHODS)
        assert not any("SECRETGOLD" in p for p in preds["prompt"])
        assert set(preds["gold"]) == {f"SECRETGOLD{uid}"}
    assert set(store.run_metrics(run_id)["metric"]) >= {"rouge-1", "rouge-L"}


def test_resume_skips_complete_users_and_redoes_incomplete_ones(base_cfg, monkeypatch):
    import shutil

    import oppu.multilora

    run_id = run_experiment(base_cfg)
    store = Store(base_cfg.db)
    first = store.predictions_for(run_id, "alice")
    trained = []
    real = oppu.multilora.train_users  # the default LoRA engine's trainer (oppu.banks.MultiLoraBank)
    monkeypatch.setattr(oppu.multilora, "train_users",
                        lambda *a, **k: trained.extend(u.id for u in a[3]) or real(*a, **k))
    assert run_experiment(base_cfg, run_id=run_id) == run_id
    assert trained == []  # everything complete: nothing retrained
    shutil.rmtree(adapter_folder(base_cfg, run_id, "bob", method_style(base_cfg, "oppu")))
    run_experiment(base_cfg, run_id=run_id)
    assert trained == ["bob"]
    assert len(store.predictions_for(run_id, "alice")) == len(first)  # idempotent: no duplicate rows
    runs = store.runs()
    assert runs.loc[runs.run_id == run_id, "status"].item() == "done"


def test_should_stop_cancels_and_resume_finishes(base_cfg):
    run_id = run_experiment(base_cfg, should_stop=lambda: True)
    store = Store(base_cfg.db)
    runs = store.runs()
    assert runs.loc[runs.run_id == run_id, "status"].item() == "cancelled"
    assert store.done_users(run_id) == set()
    run_experiment(base_cfg, run_id=run_id)
    assert store.done_users(run_id) == {"alice", "bob"}


def test_privacy_training_b_leaves_a_untouched(base_cfg, tiny_data_dir):
    cfg_a = base_cfg.replace(user_ids=("alice",), task_adaptation=False)
    run_id = run_experiment(cfg_a)
    folder_a = adapter_folder(cfg_a, run_id, "alice", method_style(cfg_a, "oppu"))
    before = {p.name: p.read_bytes() for p in folder_a.iterdir()}
    cfg_b = cfg_a.replace(user_ids=("bob",))
    run_experiment(cfg_b, run_id=run_id)
    assert {p.name: p.read_bytes() for p in folder_a.iterdir()} == before
    manifest_b = read_manifest(adapter_folder(cfg_b, run_id, "bob", method_style(cfg_b, "oppu")))
    assert manifest_b["item_ids"] and all(i.startswith("bob-") for i in manifest_b["item_ids"])
    assert read_manifest(folder_a)["data_hash"] != manifest_b["data_hash"]


def test_history_cutoff_limits_training_and_retrieval(base_cfg):
    cfg = base_cfg.replace(methods=("rag", "oppu"), user_ids=("alice",), history_cutoff="2020-01-04",
                           task_adaptation=False)
    run_id = run_experiment(cfg)
    preds = Store(cfg.db).predictions_for(run_id, "alice")
    assert set(preds["history_size"]) == {3}
    assert all(i in {"alice-h0", "alice-h1", "alice-h2"} for ids in preds["retrieved_ids"] for i in ids)
    manifest = read_manifest(adapter_folder(cfg, run_id, "alice", method_style(cfg, "oppu")))
    assert manifest["item_ids"] == ["alice-h0", "alice-h1", "alice-h2"]


@pytest.mark.parametrize("kind", ["ia3", "prompt"])
def test_other_peft_kinds_run_end_to_end(base_cfg, kind):
    cfg = base_cfg.replace(methods=("oppu", "oppu+rag"), users=1, task_adaptation=False,
                           user_peft=PeftConfig(kind=kind, num_virtual_tokens=4))
    run_id = run_experiment(cfg)
    preds = Store(cfg.db).predictions_for(run_id, "alice")
    assert set(preds["peft"]) == {kind} and len(preds) == 4


def test_text_only_history_drops_labels_from_retrieved_items(base_cfg):
    cfg = base_cfg.replace(methods=("rag",), user_ids=("alice",), history_format="text_only",
                           task_adaptation=False)
    prompts = Store(cfg.db).predictions_for(run_experiment(cfg), "alice")["prompt"]
    assert all("Past items of this user:" in p and "tag: comedy\n" not in p.split("\n\n")[0] for p in prompts)
    past = [p.split("\n\n")[0] for p in prompts]
    assert not any(f"tag: {t}" in block for block in past for t in ("comedy", "action", "romance"))


def test_sweep_configs_cover_the_papers_analyses(base_cfg):
    from oppu.analyses import SWEEPS, sweep_configs

    assert set(SWEEPS) == {"k", "activity", "peft", "history-format", "behaviour-shift"}
    ks = sweep_configs("k", base_cfg)
    assert [c.retrieval.k for c in ks] == [0, 1, 2, 4, 8] and all(c.tag == "k-sweep" for c in ks)
    assert {c.user_peft.kind for c in sweep_configs("peft", base_cfg)} == {"lora", "ia3", "prompt"}
    assert {c.history_format for c in sweep_configs("history-format", base_cfg)} == {"full", "text_only"}
    (activity,) = sweep_configs("activity", base_cfg)
    assert activity.users >= base_cfg.users
    shift = sweep_configs("behaviour-shift", base_cfg)
    assert shift[0].history_cutoff is None and all(c.history_cutoff for c in shift[1:])
    with pytest.raises(ValueError, match="behaviour-shift"):
        sweep_configs("nope", base_cfg)


def test_chunks_after_the_first_reuse_the_emptied_pool(base_cfg, monkeypatch):
    import oppu.experiment

    monkeypatch.setattr(oppu.experiment, "USERS_PER_CHUNK", 1)
    cfg = base_cfg.replace(methods=("pag", "oppu", "oppu+pag"), users=3, task_adaptation=False)
    run_id = run_experiment(cfg)
    store = Store(cfg.db)
    assert store.done_users(run_id) == {"alice", "bob", "carol"}
    assert len(store.predictions_for(run_id, "bob")) == 3 * 2


def test_stored_run_config_is_portable(base_cfg):
    cfg = base_cfg.replace(methods=("none",), users=1, task_adaptation=False)
    run_id = run_experiment(cfg)
    row = Store(cfg.db).runs().set_index("run_id").loc[run_id]
    assert cfg.artifacts_dir not in row["config"] and cfg.model.name not in row["config"]
    assert cfg.model.name not in row["model"]
    assert json.loads(row["config"])["methods"] == ["none"]  # what the store reads back still holds


def _adapter_tensors(cfg, run_id, user_id):
    from safetensors.torch import load_file

    return load_file(str(adapter_folder(cfg, run_id, user_id, method_style(cfg, "oppu")) / "adapter_model.safetensors"))


def test_multi_lora_adapters_do_not_depend_on_chunk_companions(base_cfg, monkeypatch):
    """The default engine trains a chunk's users together (LoRA dropout on): a user's adapter and answers must be
    the same whether it shares its batches with others or trains alone, or Ray shares, resumed jobs and chunk
    sizes would change results."""
    import oppu.experiment
    import oppu.model

    # float64: the two runs put a user's rows in other chunks and batches, so their float32 adapters would differ
    # by rounding that AdamW amplifies to ~1e-4 on some CPUs; float64's ~1e-16 roundoff leaves ~1e-13, far inside
    # the 1e-9 tolerance, while coupling a chunk's users (one clip over all of them) moves elements by ~lr. Step
    # counts and dropout seeds per user are checked in tests/test_multilora.py, where users join late.
    monkeypatch.setattr(oppu.model, "resolve_dtype", lambda dtype, device: torch.float64)
    cfg = base_cfg.replace(users=3, task_adaptation=False)
    assert cfg.batching == "multi_lora" and cfg.user_peft.dropout > 0
    together = run_experiment(cfg)
    monkeypatch.setattr(oppu.experiment, "USERS_PER_CHUNK", 1)
    alone = run_experiment(cfg)
    store = Store(cfg.db)
    for user in ("alice", "bob", "carol"):
        a, b = _adapter_tensors(cfg, together, user), _adapter_tensors(cfg, alone, user)
        assert set(a) == set(b)
        for key in a:
            assert a[key].dtype == torch.float64
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-9)
        assert read_manifest(adapter_folder(cfg, together, user, method_style(cfg, "oppu")))["engine"] == "multi_lora"
        cols = ["query_id", "method", "output"]
        assert (store.predictions_for(together, user)[cols].sort_values(cols).values.tolist()
                == store.predictions_for(alone, user)[cols].sort_values(cols).values.tolist())


def test_per_user_engine_still_runs_and_writes_the_same_folder_layout(base_cfg):
    from oppu.model import AdapterPool

    cfg = base_cfg.replace(users=1, task_adaptation=False, batching="per_user")
    run_id = run_experiment(cfg)
    folder = adapter_folder(cfg, run_id, "alice", method_style(cfg, "oppu"))
    assert read_manifest(folder)["engine"] == "per_user"
    multi = base_cfg.replace(users=1, task_adaptation=False)
    other = adapter_folder(multi, run_experiment(multi), "alice", method_style(multi, "oppu"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in other.iterdir())
    assert set(_adapter_tensors(cfg, run_id, "alice")) == set(load_peft_keys(other))
    from oppu.model import load_model

    model, _ = load_model(cfg.model)
    pool = AdapterPool(model)
    pool.load("alice", other)  # a multi-LoRA adapter is a plain PEFT folder
    assert pool.kind == "lora"


def load_peft_keys(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_sampled_generation_on_the_multi_lora_engine_is_seeded(base_cfg):
    cfg = base_cfg.replace(users=1, task_adaptation=False,
                           generation=GenerationConfig(greedy=False, temperature=1.0, max_new_tokens=4, seed=3))
    store = Store(cfg.db)
    first, second = (store.predictions_for(run_experiment(cfg), "alice") for _ in range(2))
    cols = ["query_id", "method", "raw_output"]
    assert first[cols].sort_values(cols).values.tolist() == second[cols].sort_values(cols).values.tolist()


def test_a_bf16_base_trains_fp32_factors_end_to_end(base_cfg):
    """`--dtype bfloat16` (the GPU default, an option on CPUs with fast bf16): the multi-LoRA engine trains fp32
    factors over the 16-bit base and saves them as a normal fp32 PEFT adapter."""
    cfg = base_cfg.replace(users=1, task_adaptation=False,
                           model=base_cfg.model.__class__(name=base_cfg.model.name, device="cpu", dtype="bfloat16"))
    run_id = run_experiment(cfg)
    tensors = _adapter_tensors(cfg, run_id, "alice")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k), "B never moved"
    assert len(Store(cfg.db).predictions_for(run_id, "alice")) == 2 * 2


def test_bases_prepared_ahead_are_the_ones_a_run_uses(base_cfg):
    """`oppu prepare` builds the quick demo's task-adapted bases with `prepare_bases`: the run that follows must
    find every one of them cached (no adaptation step runs) and answer exactly as a run that built them itself."""
    from oppu.experiment import prepare_bases, run_styles

    cfg = base_cfg.replace(methods=("none", "rag", "oppu", "oppu+rag"))
    built = prepare_bases(cfg)
    assert set(built) == set(run_styles(cfg)) and not any(r.cached for r in built.values())
    events = []
    run_id = run_experiment(cfg, progress=lambda *a: events.append(a))
    adapt = [e for e in events if str(e[0]).startswith("adapt")]
    assert adapt and all(step == total == 0 for _, step, total, _ in adapt)  # announced as cached: nothing trained
    again = prepare_bases(cfg)
    assert all(r.cached and r.folder == built[s].folder for s, r in again.items())

    fresh = cfg.replace(artifacts_dir=cfg.artifacts_dir + "-fresh", db=cfg.db + "-fresh")
    fresh_id = run_experiment(fresh)
    for user in Store(cfg.db).done_users(run_id):
        ours = Store(cfg.db).predictions_for(run_id, user)
        theirs = Store(fresh.db).predictions_for(fresh_id, user)
        assert list(ours["raw_output"]) == list(theirs["raw_output"]) and len(ours) == 4 * len(set(ours.query_id))
