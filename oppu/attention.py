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
from collections.abc import Iterator

import torch

LEAN_EAGER = "oppu_lean_eager"
"""The name `lean_eager_attention` is registered under with transformers (attention and mask interfaces)."""
LEAN_EAGER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
"""Model types whose eager attention is exactly the maths `lean_eager_attention` re-implements (transformers 5.24:
the same `eager_attention_forward`; sliding windows live in their masks). Others (softcapping, attention sinks)
train with their own attention."""


class _SoftmaxKeptInInputDtype(torch.autograd.Function):
    """softmax(scores) computed in (at least) fp32 and returned in the scores' dtype, as Hugging Face's eager
    attention does; only that 16-bit result is kept for backward (which the following matmul with the values keeps
    anyway), not the fp32 probabilities beside it. The backward is softmax's, p * (g - sum(g * p)), in fp32 from
    the 16-bit p: the probabilities the forward's output was actually computed with."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1, dtype=_at_least_fp32(scores.dtype)).to(scores.dtype)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        wide = _at_least_fp32(probs.dtype)
        p, g = probs.to(wide), grad.to(wide)
        return (p * (g - (g * p).sum(-1, keepdim=True))).to(probs.dtype)


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for a 16-bit model, as Hugging Face's eager softmax; a float64 model (the exactness tests) keeps
    float64 where Hugging Face's would round to fp32."""
    return torch.promote_types(dtype, torch.float32)


def lean_eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                         **kwargs):
    """Hugging Face's `eager_attention_forward` (grouped keys and values repeated, scaled scores plus the additive
    mask, softmax in fp32 back to the query's dtype, dropout, probabilities times values), keeping one 16-bit copy
    of the probabilities for backward. Refuses what that maths does not cover rather than ignore it."""
    unsupported = [name for name in ("softcap", "s_aux", "sinks") if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"lean eager attention does not implement {', '.join(unsupported)}: train this model "
                         "with its own attention (it is not in oppu.attention.LEAN_EAGER_MODEL_TYPES)")
    from transformers.models.llama.modeling_llama import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = _SoftmaxKeptInInputDtype.apply(scores)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, None


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
