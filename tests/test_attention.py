"""The lean eager training attention: Hugging Face's eager attention's forward, its gradients, less memory kept."""

from __future__ import annotations

import pytest
import torch

from oppu.attention import LEAN_EAGER, lean_eager_attention, register, training_attention


class _Layer(torch.nn.Module):
    """What the attention functions read off a Llama attention layer."""

    num_key_value_groups = 2

    def __init__(self):
        super().__init__()
        self.train()


def _inputs(dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 9, 8, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(2, 2, 9, 8, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    causal = torch.full((9, 9), torch.finfo(dtype).min, dtype=dtype).triu(1)
    mask = causal.expand(2, 1, 9, 9).clone()
    mask[1, ..., :2] = torch.finfo(dtype).min  # a left-padded row
    mask[1, ..., :2, :2] = 0  # its padding attends to itself, as Hugging Face's masks leave it
    return q, k, v, mask


def _run(fn, dtype, seed: int = 0):
    q, k, v, mask = _inputs(dtype, seed)
    out, _ = fn(_Layer(), q, k, v, mask, scaling=8 ** -0.5, dropout=0.0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    out.backward(grad)
    return out.detach(), [t.grad for t in (q, k, v)]


def _hf_eager():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


def _exact(module, q, k, v, mask, scaling, dropout=0.0):
    """Attention by autograd in the inputs' own dtype (float64 here): the reference for the maths."""
    from transformers.models.llama.modeling_llama import repeat_kv

    k, v = repeat_kv(k, module.num_key_value_groups), repeat_kv(v, module.num_key_value_groups)
    probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * scaling + mask, dim=-1)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


def test_lean_eager_is_attention_and_its_gradient_in_float64():
    """Same maths: in float64 the output and the hand-written backward agree with autograd through an exact
    softmax to float64 rounding. (Hugging Face's eager softmax would round to fp32 here.)"""
    ours, theirs = _run(lean_eager_attention, torch.float64), _run(_exact, torch.float64)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-12)
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_lean_eager_in_bf16_has_eager_forward_and_close_gradients():
    """The forward is Hugging Face's eager maths with the same roundings to bf16 (scores, probabilities, output);
    only the order of the fp32 sums inside a matmul may differ (the heads of a group are one matrix), which can
    flip a rare bf16 rounding: the output stays within one bf16 unit (2^-8 relative) overall. The backward starts
    from the bf16 probabilities instead of the fp32 ones: each differs by at most half a bf16 unit (2^-9
    relative), so the gradients may differ by a few bf16 roundings (2^-8 ~ 0.4% each), not by more. A wrong mask
    or head mapping would be off by tens of percent."""
    ours, theirs = _run(lean_eager_attention, torch.bfloat16), _run(_hf_eager(), torch.bfloat16)
    assert _relative(ours[0], theirs[0]) < 2 ** -8
    for a, b in zip(ours[1], theirs[1], strict=True):
        assert _relative(a, b) < 4 * 2 ** -8


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_lean_eager_keeps_no_fp32_probabilities_for_backward():
    """The memory it exists for: of the tensors of one score per (row, head, query, key) kept for backward in a
    bf16 forward (the lean attention lays the heads of a group out as one matrix), Hugging Face's eager keeps an
    fp32 one besides the bf16 one; the lean attention keeps only the bf16 one."""
    def kept_scores(fn):
        kept = []

        def pack(t):
            if t.shape[-1] == 9 and t.numel() == 2 * 4 * 9 * 9:
                kept.append(t.dtype)
            return t

        q, k, v, mask = _inputs(torch.bfloat16)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(_Layer(), q, k, v, mask, scaling=8 ** -0.5, dropout=0.0)
        return kept

    assert torch.float32 in kept_scores(_hf_eager())
    assert kept_scores(lean_eager_attention) and set(kept_scores(lean_eager_attention)) == {torch.bfloat16}


def test_a_llama_runs_the_registered_lean_eager_like_eager():
    """Registered with transformers, a float32 model set to it builds eager's additive mask and runs eager's maths:
    the same logits, padded rows included, up to the order of fp32 sums inside a matmul (each logit within a few
    fp32 units of its size, 2^-23 relative; a wrong mask or head mapping is off by whole percents)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    logits = {}
    for name in ("eager", LEAN_EAGER):
        model.config._attn_implementation = name
        with torch.no_grad():
            logits[name] = model(input_ids=ids, attention_mask=mask).logits
    scale = float(logits["eager"].abs().max())
    torch.testing.assert_close(logits[LEAN_EAGER], logits["eager"], rtol=0, atol=64 * 2 ** -23 * scale)
    assert not torch.equal(logits["eager"][1, 3:], logits["eager"][0, :4])  # the padding does change row 1


def test_only_llama_style_16bit_cpu_models_train_with_it():
    """The rule: a 16-bit model on a CPU whose eager attention is the maths re-implemented (Llama, Mistral, Qwen2);
    a float32 model, or an architecture with softcapping (Gemma 2), keeps its own attention; softcapping passed in
    anyway is refused, not ignored."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    small = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    llama = LlamaForCausalLM(LlamaConfig(**small))
    assert training_attention(llama) is None
    assert training_attention(llama.to(torch.bfloat16)) == LEAN_EAGER
    gemma = Gemma2ForCausalLM(Gemma2Config(head_dim=8, **small)).to(torch.bfloat16)
    assert training_attention(gemma) is None
    q, k, v, mask = _inputs(torch.float64)
    with pytest.raises(ValueError, match="softcap"):
        lean_eager_attention(_Layer(), q, k, v, mask, scaling=0.1, softcap=50.0)
