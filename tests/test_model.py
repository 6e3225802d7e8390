"""Model loading, end-of-sequence ids, the adapter pool and the adapter folder round trip (tiny Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oppu.config import ModelConfig, PeftConfig
from oppu.manifest import read_manifest
from oppu.model import (
    AdapterPool,
    ModelLoadError,
    adapter_complete,
    chat_end_token,
    eos_token_ids,
    load_model,
    save_user_adapter,
)


def _perturb(pool: AdapterPool, user_id: str, seed: int) -> None:
    """LoRA B starts at zero (an adapter is the identity until trained): give it distinct random weights."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in pool.trainable_parameters(user_id):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def test_load_model_from_folder_is_eval_fp32_with_pad(tiny_model):
    import torch

    model, tok = tiny_model
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token_id is not None


def _per_row_weight_ops(model, input_ids, **kwargs) -> tuple[list[str], object]:
    """The operators of a forward that take the vocabulary matrix expanded to one copy per row
    ([rows, hidden, vocab]: torch's batched matmul path, which in bf16 also writes those copies), and its logits."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    vocab, hidden = model.get_output_embeddings().weight.shape
    expanded = [input_ids.shape[0], hidden, vocab]
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        logits = model(input_ids=input_ids, **kwargs).logits
    return [e.name for e in prof.events() if expanded in (e.input_shapes or [])], logits


def test_a_last_position_prefill_does_not_copy_the_vocabulary_matrix(tiny_model):
    """`logits_to_keep=1` hands the output projection a strided [rows, 1, hidden] view, for which torch's matmul
    expands the frozen weight to one copy per row (`oppu.model.contiguous_head_input`). The loaded model's
    projection must take the plain matrix product instead, with the same logits as without the hook."""
    import torch

    model, _ = tiny_model
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen base, as every run has: the slow path needs a weight without grad
    ids = torch.randint(5, model.config.vocab_size, (6, 9), generator=torch.Generator().manual_seed(0))
    per_row, logits = _per_row_weight_ops(model, ids, logits_to_keep=1)
    assert per_row == []
    head = model.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)
    head._forward_pre_hooks.clear()
    try:
        plain_per_row, plain_logits = _per_row_weight_ops(model, ids, logits_to_keep=1)
    finally:
        head._forward_pre_hooks.update(hooks)
    assert "aten::bmm" in plain_per_row, "torch no longer expands the weight without the hook: it may be dropped"
    # mm and bmm sum the 32-term dot products in different orders: a few fp32 roundings apart.
    assert torch.allclose(logits, plain_logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(logits[:, -1], model(input_ids=ids).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_end_ids_come_from_the_chat_template(tiny_model):
    model, tok = tiny_model
    assert chat_end_token(tok) == "<|im_end|>"
    ids = eos_token_ids(tok, model)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id in ids


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(ModelConfig(name=str(tmp_path), device="cpu"))


def test_pool_wraps_the_base_once_and_keys_adapters_by_user(tiny_model):
    model, _ = tiny_model
    pool = AdapterPool(model)
    pool.add("alice", PeftConfig())
    wrapper = pool.model
    pool.add("bob/../x", PeftConfig())  # hostile id: still a valid, distinct adapter name
    assert pool.model is wrapper
    assert set(pool.names()) == {"alice", "bob/../x"}
    assert "." not in pool.name_of("bob/../x") and "/" not in pool.name_of("bob/../x")
    assert type(pool.model.base_model.model).__name__ == "LlamaForCausalLM"  # no PeftModel nested in a PeftModel
    pool.delete("alice")
    assert "alice" not in pool and pool.name_of("bob/../x") in pool.model.peft_config
    with pytest.raises(ValueError, match="cannot mix"):
        pool.add("carol", PeftConfig(kind="prompt"))


def test_trainable_parameters_are_only_that_users(tiny_model):
    model, _ = tiny_model
    pool = AdapterPool(model)
    pool.add("alice", PeftConfig())
    pool.add("bob", PeftConfig())
    alice = {id(p) for p in pool.trainable_parameters("alice")}
    trainable = {id(p) for p in pool.model.parameters() if p.requires_grad}
    assert alice == trainable and len(alice) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_adapter_round_trip_with_peft_from_pretrained(tiny_model, tiny_model_dir, tmp_path):
    import peft
    import torch

    model, tok = tiny_model
    pool = AdapterPool(model)
    pool.add("alice", PeftConfig())
    _perturb(pool, "alice", 1)
    folder = save_user_adapter(pool, "alice", tmp_path / "alice", {"item_ids": ["a1"], "config": {"x": 1}})
    assert adapter_complete(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "manifest.json"]
    manifest = read_manifest(folder)
    assert manifest["user_id"] == "alice" and manifest["item_ids"] == ["a1"] and manifest["created"]
    assert str(tmp_path) not in json.dumps(manifest)

    ids = tok("description: space ship", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pool.set("alice")
        expected = pool.model(input_ids=ids).logits
        fresh, _ = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
        loaded = peft.PeftModel.from_pretrained(fresh, str(folder))
        got = loaded(input_ids=ids).logits
    # the same saved weights through one float32 forward (no training): rounding ~1e-7, no steps to amplify it
    assert torch.allclose(expected, got, atol=1e-5)
    assert not Path(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]).is_absolute()

    other = AdapterPool(load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))[0])
    other.load("alice", folder)
    other.set("alice")
    with torch.no_grad():
        assert torch.allclose(other.model(input_ids=ids).logits, expected, atol=1e-5)


def test_saving_again_replaces_the_folder_atomically(tiny_model, tmp_path):
    model, _ = tiny_model
    pool = AdapterPool(model)
    pool.add("alice", PeftConfig())
    save_user_adapter(pool, "alice", tmp_path / "a", {"train_loss": 1.0})
    save_user_adapter(pool, "alice", tmp_path / "a", {"train_loss": 0.5})
    assert read_manifest(tmp_path / "a")["train_loss"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp or old folders left behind


@pytest.mark.slow
def test_embedded_model_loads_from_cache_and_generates():
    from oppu.config import GenerationConfig
    from oppu.generate import generate
    from oppu.model import prepare_embedded_model

    cache = prepare_embedded_model()  # converts once (~40 s) when the cache is missing
    weights = sorted(Path(cache).glob("*.safetensors"))
    before = [w.stat().st_mtime_ns for w in weights]
    model, tok = load_model(ModelConfig(device="cpu"))
    # Loaded from the cache, not converted again (how fast: `python -m bench.startup`, never a timed assert).
    assert weights and [w.stat().st_mtime_ns for w in weights] == before
    assert chat_end_token(tok) == "<|im_end|>"
    out = generate(model, tok, ["Say hello."], None, GenerationConfig(), max_new_tokens=6)
    assert isinstance(out[0], str) and out[0].strip()
