"""The attention a training forward runs with, and the lean eager attention a 16-bit model trains with on a CPU.

Why (measured on the 2-core AMX Xeon, `python -m bench.attention`, docs/PERFORMANCE.md): with a bf16 model on a
CPU, the backward of torch's CPU flash attention, which Hugging Face's `sdpa` takes there, cost ~4.7 ms a layer
for 2 x 128 tokens, a quarter of a training step; attention as plain matmuls and a softmax ("eager") made the step
1.1-1.3x faster. But Hugging Face's eager attention keeps its probabilities twice for backward (the fp32 softmax
output and its bf16 copy: 6 bytes per score, ~200 MiB for two 256-token rows over 30 layers), which took a default
run's RAG-style training above 2 GB. `lean_eager_attention` computes the same forward and keeps the bf16 copy only
(2 bytes per score). In float32 `sdpa` was as fast, and on a GPU its flash kernels are the fast path, so those keep
it; generation keeps `sdpa` everywhere (its forward is not the slow part).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

LEAN_EAGER = "oppu_lean_eager"
"""The name `lean_eager_attention` is registered under with transformers (attention and mask interfaces)."""
LEAN_EAGER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
"""Model types whose eager attention is exactly the maths `lean_eager_attention` re-implements (transformers 5.24:
the same `eager_attention_forward`; sliding windows live in their masks). Others (softcapping, attention sinks)
train with their own attention."""


def _softmax_in_wide_precision(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim as Hugging Face's eager attention takes it (computed in at least fp32, returned in
    the scores' dtype). torch's CPU softmax already computes a bf16/fp16 input in fp32 and rounds once, so for a
    16-bit input the native op is that, without the fp32 copies of the scores and probabilities on either side
    (and its backward is one fused kernel that keeps only the 16-bit output, where the fp32 route kept both). A
    float64 input stays float64 (the exactness tests), where Hugging Face's would round to fp32."""
    if scores.dtype in (torch.bfloat16, torch.float16) and scores.device.type == "cpu":
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)


def _power_of_two(x: float) -> bool:
    """Whether multiplying by `x` is exact in binary floating point (barring overflow and subnormals)."""
    return x > 0 and math.frexp(x)[0] == 0.5


def lean_eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                         **kwargs):
    """Hugging Face's `eager_attention_forward` (scaled scores plus the additive mask, softmax in fp32 back to the
    query's dtype, dropout, probabilities times values) with fewer passes over the scores and one 16-bit copy of
    the probabilities kept for backward. Refuses what that maths does not cover rather than ignore it.

    - The query heads that share a key/value head are one matrix ([groups x tokens, head_dim]) against that head,
      instead of Hugging Face's copies of each key/value head per query head (and the sums of their gradients).
    - A power-of-two `scaling` (head_dim 64: 1/8) scales the queries, not the scores: the same bits, and a pass
      over [tokens, head_dim] instead of [tokens, tokens] in both directions. Another scaling scales the scores
      in place, as Hugging Face does.
    - The mask is added in place: no new [rows, heads, tokens, tokens] tensor.
    """
    unsupported = [name for name in ("softcap", "s_aux", "sinks") if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"lean eager attention does not implement {', '.join(unsupported)}: train this model "
                         "with its own attention (it is not in oppu.attention.LEAN_EAGER_MODEL_TYPES)")
    rows, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if _power_of_two(scaling):
        query = query * scaling
    # Query head h reads key/value head h // groups (Hugging Face's repeat_kv order), so the heads of one group
    # are consecutive: [rows, kv_heads, groups * q_len, head_dim].
    grouped = query.reshape(rows, kv_heads, groups * q_len, head_dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)).view(rows, kv_heads, groups, q_len, kv_len)
    if not _power_of_two(scaling):
        scores.mul_(scaling)
    if attention_mask is not None:
        # [rows or 1, 1, q_len, kv_len] -> one mask for every head of a group
        scores.add_(attention_mask[:, :, None])
    probs = _softmax_in_wide_precision(scores)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.view(rows, kv_heads, groups * q_len, kv_len), value)
    return out.view(rows, heads, q_len, head_dim).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `LEAN_EAGER` a name transformers' attention layers and mask builder know (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(LEAN_EAGER, lean_eager_attention)
    AttentionMaskInterface.register(LEAN_EAGER, eager_mask)  # the additive float mask eager attention takes


def training_attention(model) -> str | None:
    """The attention a training forward of `model` runs with, or None for the model's own (`sdpa`): the lean eager
    attention for a bf16/fp16 model on a CPU (see the module's docstring)."""
    if (next(model.parameters()).device.type == "cpu" and is_16bit(model)
            and _model_config(model).model_type in LEAN_EAGER_MODEL_TYPES):
        return LEAN_EAGER
    return None


def is_16bit(model) -> bool:
    """Whether the base model computes in bf16/fp16 (its embedding's dtype: adapters may hold fp32 factors)."""
    return model.get_input_embeddings().weight.dtype in (torch.bfloat16, torch.float16)


def _model_config(model):
    """The transformers config the attention layers read (a PEFT model's is its base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


@contextlib.contextmanager
def attention_set(model, attention: str) -> Iterator[None]:
    """Within the block, `model`'s attention layers run `attention` (a transformers name, or `LEAN_EAGER`); the
    model's own attention is back after it."""
    register()
    config = _model_config(model)
    before = config._attn_implementation
    config._attn_implementation = attention
    try:
        yield
    finally:
        config._attn_implementation = before


@contextlib.contextmanager
def training_forward(model) -> Iterator[None]:
    """Within the block, `model`'s forwards run with `training_attention(model)`; its own attention after it.

    The backward of a forward taken inside the block runs what that forward recorded, so it may run outside.
    """
    attention = training_attention(model)
    if attention is None:
        yield
        return
    with attention_set(model, attention):
        yield
