"""The `dtype="auto"` policy (oppu/precision.py) and both compute dtypes on the tiny models.

The policy's decisions are checked with the probe replaced (a timed probe would make the test depend on the CPU);
the real probe is only checked to measure something. Equality between multi-LoRA and PEFT is checked in float32
and bfloat16 with normwise tolerances derived from each format's unit roundoff, each shown to be far below what
a mis-routed row changes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from oppu import precision
from oppu.precision import AUTO_DTYPE_ENV, Probe

# Unit roundoff (half an ulp at 1) of each format: float32 keeps 24 significand bits, bfloat16 only 8.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
# Multi-LoRA and PEFT run the same kernels on the same inputs and differ only in where the LoRA sum is rounded to
# the base's dtype (multi-LoRA rounds the delta, then adds; PEFT adds in float32, then rounds): one extra rounding
# per wrapped projection, 4 in the 2-layer models here (q and v of each layer), each passed on with a gain of about
# one through normalised residual layers. 4 u, doubled for the logits' own rounding in both paths: 8 u, i.e.
# 3.1e-2 in bfloat16 (measured 5.8e-3 forward and 6.3e-3 for gradients on an AMX Xeon) and 1e-6 in float32
# (measured 0 and 8e-8). A row given another user's adapter moves the logits by ~1 (checked below).
ROUNDINGS = 8


def normwise(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# -- the policy ------------------------------------------------------------------------------------------------
@pytest.fixture
def probed(monkeypatch, tmp_path):
    """Unpins `auto` (the suite pins float32) and replaces the timed probe by one returning `speedup`; counts calls."""
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)
    calls = []

    def set_speedup(speedup: float):
        def fake_probe(*args, **kwargs):
            calls.append(speedup)
            return Probe(fp32_s=speedup * 1e-3, bf16_s=1e-3, threads=1)

        monkeypatch.setattr(precision, "probe_cpu", fake_probe)

    set_speedup(1.0)
    return tmp_path, calls, set_speedup


def test_auto_takes_bf16_on_a_cpu_only_where_the_probe_measured_it_clearly_faster(probed):
    cache, calls, set_speedup = probed
    set_speedup(precision.BF16_MIN_SPEEDUP * 2)
    assert precision.auto_dtype("cpu", cache / "fast") == "bfloat16"
    set_speedup(precision.BF16_MIN_SPEEDUP * 0.9)  # faster, but not by enough to be sure of a whole model
    assert precision.auto_dtype("cpu", cache / "marginal") == "float32"
    set_speedup(0.2)  # an AVX2-only CPU: bf16 far slower
    assert precision.auto_dtype("cpu", cache / "slow") == "float32"
    assert precision.auto_dtype("cuda", cache / "gpu") == "bfloat16"
    assert len(calls) == 3  # CUDA needs no probe


def test_the_verdict_is_cached_per_machine_and_measured_again_on_another(probed, monkeypatch):
    cache, calls, set_speedup = probed
    set_speedup(5.0)
    assert precision.auto_dtype("cpu", cache) == "bfloat16"
    set_speedup(0.5)  # a probe now would say fp32: the cached verdict must win, run after run
    assert [precision.auto_dtype("cpu", cache) for _ in range(3)] == ["bfloat16"] * 3
    assert calls == [5.0]
    saved = json.loads(precision.verdict_path(cache).read_text())
    assert saved["dtype"] == "bfloat16" and saved["speedup"] == 5.0 and saved["torch"] == torch.__version__

    name, flags = precision.cpu_facts()
    monkeypatch.setattr(precision, "cpu_facts", lambda: (name, tuple(f for f in flags if "bf16" not in f)
                                                         + ("another_cpu",)))
    assert precision.auto_dtype("cpu", cache) == "float32"  # other flags: another machine, probed again
    assert calls == [5.0, 0.5]
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    precision.auto_dtype("cpu", cache)
    assert len(calls) == 3  # another torch build: probed again
    assert len(list((cache / "precision").glob("*.json"))) == 3


def test_prepare_measures_again_when_forced(probed):
    cache, _, set_speedup = probed
    set_speedup(5.0)
    precision.probe_and_cache(cache)
    set_speedup(0.5)
    assert precision.probe_and_cache(cache, force=True)["dtype"] == "float32"
    assert precision.auto_dtype("cpu", cache) == "float32"


def test_the_pin_overrides_the_probe_and_is_checked(probed, monkeypatch):
    from oppu.config import ConfigError

    cache, calls, _ = probed
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")
    assert precision.auto_dtype("cpu", cache) == "bfloat16" and calls == []
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bf16")
    with pytest.raises(ConfigError, match="float32, bfloat16"):
        precision.auto_dtype("cpu", cache)


def test_an_explicit_dtype_is_never_probed(probed):
    cache, calls, _ = probed
    assert precision.compute_dtype("float32", "cpu", cache) == "float32"
    assert precision.compute_dtype("bfloat16", "cpu", cache) == "bfloat16"
    assert calls == []


def test_the_real_probe_measures_both_dtypes_and_restores_threads():
    threads = torch.get_num_threads()
    probe = precision.probe_cpu(seconds=0.01, shape=(16, 32, 64))
    assert probe.fp32_s > 0 and probe.bf16_s > 0 and probe.dtype in ("float32", "bfloat16")
    assert torch.get_num_threads() == threads


def test_machine_key_names_cpu_flags_and_torch(monkeypatch):
    key = precision.machine_key()
    assert key == precision.machine_key() and len(key) == 16
    name, flags = precision.cpu_facts()
    monkeypatch.setattr(precision, "cpu_facts", lambda: (name + " other", flags))
    assert precision.machine_key() != key


# -- loading and recording ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pinned", ["float32", "bfloat16"])
def test_load_model_computes_in_what_auto_resolves_to(tiny_model_dir, monkeypatch, tmp_path, pinned):
    from oppu.config import ModelConfig
    from oppu.model import compute_dtype_name, load_model

    monkeypatch.setenv(AUTO_DTYPE_ENV, pinned)
    cfg = ModelConfig(name=str(tiny_model_dir), device="cpu")
    model, _ = load_model(cfg, tmp_path)
    assert next(model.parameters()).dtype == getattr(torch, pinned)
    assert compute_dtype_name(cfg, tmp_path) == pinned


def test_compute_dtype_is_a_recorded_field_that_reads_back():
    from oppu.config import ConfigError, ModelConfig, RunConfig

    cfg = RunConfig(model=ModelConfig(compute_dtype="bfloat16"))
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="compute_dtype"):
        ModelConfig(compute_dtype="bf16")


@pytest.fixture
def bf16_run(monkeypatch, tiny_data_dir, tiny_model_dir, tmp_path):
    """A config whose `auto` resolves to bfloat16 (pinned, as a probe on a bf16 CPU would resolve it)."""
    from oppu.config import ModelConfig, RunConfig, TrainConfig

    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")

    def make(name: str, **changes):
        return RunConfig(task="LaMP_2M", methods=("none", "oppu"), users=2, data_dir=str(tiny_data_dir),
                         db=str(tmp_path / name / "runs.duckdb"), artifacts_dir=str(tmp_path / name / "art"),
                         model=ModelConfig(name=str(tiny_model_dir), device="cpu"), task_adaptation=False,
                         user_train=TrainConfig(epochs=2, lr=1e-2, batch_size=2, max_length=64), **changes)

    return make


@pytest.mark.parametrize("batching", ["multi_lora", "per_user"])
def test_a_run_records_its_compute_dtype_and_saves_fp32_adapters(bf16_run, batching):
    from safetensors.torch import load_file

    from oppu.experiment import run_experiment
    from oppu.manifest import read_manifest
    from oppu.store import Store

    cfg = bf16_run(batching, batching=batching)
    store = Store(cfg.db)
    run_id = run_experiment(cfg, store=store)
    runs = store.runs()
    stored = json.loads(runs[runs["run_id"] == run_id]["config"].iloc[0])
    assert stored["model"]["dtype"] == "auto" and stored["model"]["compute_dtype"] == "bfloat16"
    folders = [p.parent for p in Path(cfg.artifacts_dir).rglob("manifest.json")
               if (p.parent / "adapter_model.safetensors").is_file()]
    assert folders, f"no adapter folders under {cfg.artifacts_dir}"
    for folder in folders:
        manifest = read_manifest(folder)
        assert manifest["compute_dtype"] == "bfloat16"
        assert manifest["config"]["model"]["compute_dtype"] == "bfloat16"
        assert all(t.dtype == torch.float32 for t in load_file(str(folder / "adapter_model.safetensors")).values())


def test_a_bf16_run_gives_the_same_answers_run_after_run(bf16_run):
    from oppu.experiment import run_experiment
    from oppu.store import Store

    outputs = []
    for name in ("first", "second"):
        cfg = bf16_run(name)
        store = Store(cfg.db)
        run_id = run_experiment(cfg, store=store)
        rows = []
        for uid in ("alice", "bob"):
            frame = store.predictions_for(run_id, uid)
            rows += sorted(zip(frame["method"], frame["query_id"], frame["output"], strict=True))
        outputs.append(rows)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 8  # 2 users x 2 queries x 2 methods


# -- multi-LoRA against PEFT in both dtypes ----------------------------------------------------------------------
VOCAB = 96


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def random_lora_state(model, seed: int, r: int = 8) -> dict[str, torch.Tensor]:
    """Non-zero A and B on q/v (B is zero at PEFT's init, which would hide a mis-routed row)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in ("q_proj", "v_proj"):
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, module.in_features, generator=gen) * 0.3
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, r, generator=gen) * 0.3
    return state


def both_engines(base, states: dict[str, dict[str, torch.Tensor]]):
    """(a PeftModel holding every user's adapter, a MultiLora holding the same) on copies of `base`."""
    import peft
    from peft.utils import set_peft_model_state_dict

    from oppu.multilora import MultiLora

    reference = None
    for name, state in states.items():
        config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 bias="none", task_type="CAUSAL_LM")
        if reference is None:
            reference = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            reference.add_adapter(name, config)
        set_peft_model_state_dict(reference, state, adapter_name=name)
    ml = MultiLora(copy.deepcopy(base), capacity=len(states), r=8, alpha=8)
    for name, state in states.items():
        ml.load_state_dict(name, state, alpha=8, r=8)
    return reference.eval(), ml


@pytest.fixture(scope="module")
def tiny():
    base = tiny_llama()
    return base, {u: random_lora_state(base, seed=i + 1) for i, u in enumerate(("ann", "ben", "cat"))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mixed_batch_equals_each_users_peft_forward(tiny, dtype):
    base, states = tiny
    reference, ml = both_engines(copy.deepcopy(base).to(dtype), states)
    ids = torch.randint(3, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    route = ["ann", "ben", None, "cat"]
    with torch.no_grad(), ml.route(route):
        mixed = ml.model(input_ids=ids).logits
    assert mixed.dtype == dtype
    rows = []
    with torch.no_grad():
        for i, user in enumerate(route):
            if user is None:
                with reference.disable_adapter():
                    rows.append(reference(input_ids=ids[i:i + 1]).logits)
            else:
                reference.set_adapter(user)
                rows.append(reference(input_ids=ids[i:i + 1]).logits)
        reference.set_adapter("ben")
        misrouted = reference(input_ids=ids[:1]).logits
    tol = ROUNDINGS * UNIT_ROUNDOFF[dtype]
    for i in range(len(route)):
        assert normwise(mixed[i], rows[i][0]) <= tol, f"row {i} ({route[i]})"
    assert normwise(misrouted[0], rows[0][0]) > 10 * ROUNDINGS * UNIT_ROUNDOFF[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_gradient_equals_peft_and_stays_fp32(tiny, dtype):
    """The same loss's gradient on one user's factors, from the multi-LoRA layers and from PEFT's: the factors are
    float32 master weights over either base, and their gradients agree to the base's rounding."""
    base, states = tiny
    reference, ml = both_engines(copy.deepcopy(base).to(dtype), {"ann": states["ann"]})
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    for p in ml.parameters():
        p.requires_grad_(True)
    with ml.route(["ann", "ann"]):
        loss_of(ml.model(input_ids=ids).logits).backward()
    for name, p in reference.named_parameters():
        p.requires_grad_("lora_" in name)
    loss_of(reference(input_ids=ids).logits).backward()
    grads = dict(reference.named_parameters())
    ours, theirs = [], []
    for module, layer in ml.layers.items():
        assert layer.lora_A.dtype == layer.lora_A.grad.dtype == torch.float32
        ours += [layer.lora_A.grad[0].T.flatten(), layer.lora_B.grad[0].T.flatten()]
        theirs += [grads[f"base_model.model.{module}.lora_{ab}.ann.weight"].grad.flatten() for ab in "AB"]
    assert normwise(torch.cat(ours), torch.cat(theirs)) <= ROUNDINGS * UNIT_ROUNDOFF[dtype]


def test_prepare_caches_the_verdict_beside_the_model(probed, monkeypatch, capsys):
    import oppu.model
    from oppu.__main__ import main

    cache, calls, set_speedup = probed
    set_speedup(5.0)
    monkeypatch.setattr(oppu.model, "prepare_embedded_model", lambda cache_dir, force=False: cache / "model")
    monkeypatch.setattr(oppu.model, "load_model", lambda cfg, cache_dir: (None, None))
    assert main(["prepare", "--cache", str(cache), "--no-demo-base"]) == 0
    assert "dtype auto on this CPU: bfloat16" in capsys.readouterr().out
    assert precision.read_verdict(cache)["dtype"] == "bfloat16" and calls == [5.0]
    set_speedup(0.5)
    assert main(["prepare", "--cache", str(cache), "--no-demo-base"]) == 0 and calls == [5.0]  # cached: not measured again
    assert main(["prepare", "--cache", str(cache), "--force", "--no-demo-base"]) == 0 and calls == [5.0, 0.5]
    assert precision.auto_dtype("cpu", cache) == "float32"


def test_the_bf16_bound_lies_between_no_gain_and_the_matmul_gain():
    """`bench.precision.speedup_bound` (Amdahl's law) is what docs/PERFORMANCE.md bounds the bf16 gain by: all
    matmul gives the matmul's speed-up, no matmul gives none, and more matmul never gives less."""
    from bench.precision import speedup_bound

    assert speedup_bound(1.0, 2.2) == pytest.approx(2.2)
    assert speedup_bound(0.0, 2.2) == pytest.approx(1.0)
    bounds = [speedup_bound(share / 10, 2.2) for share in range(11)]
    assert bounds == sorted(bounds) and 1.0 <= min(bounds) and max(bounds) <= 2.2 + 1e-12
    assert speedup_bound(0.5, 3.0) == pytest.approx(1.5)  # half the time at a third: 0.5/3 + 0.5 = 2/3
