"""The per-module maths of gathered multi-LoRA: `MultiLoraLinear` wraps one frozen `nn.Linear` with stacked
per-slot factors A [slots, in, r] and B [slots, r, out] and adds `scale[slot] * dropout(x) @ A[slot] @ B[slot]`
for each batch row's slot (two batched matmuls over gathered factors, S-LoRA/Punica style), the same code for
prefill, the KV-cached one-token decode step and training. Also the LoRA dropout and the factors' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from oppu.errors import OppuError

if TYPE_CHECKING:
    from oppu.multilora.model import MultiLora


class MultiLoraError(OppuError, ValueError):
    """Misuse of the multi-LoRA layer (unknown adapter, wrong rank, bad folder); the message says the fix."""


def factor_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """LoRA factors are trained and kept in fp32 over a 16-bit base (as PEFT's `autocast_adapter_dtype` does):
    AdamW steps of ~lr on factors of ~1e-2 would mostly round away in bf16."""
    return torch.float32 if weight_dtype in (torch.bfloat16, torch.float16) else weight_dtype


@dataclass
class Route:
    """Which slot each row of the current batch uses, shared by every layer of one model."""

    n_rows: int
    slots: torch.Tensor          # [n_active] slot of each routed row
    rows: torch.Tensor | None    # [n_active] row indices, None when every row is routed (no gather of x)
    scale: torch.Tensor          # [n_active, 1, 1] alpha/r of each routed row's adapter
    onehot: torch.Tensor         # [n_active, slots] row -> slot as a matrix (the training-time gather)
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    """Without autograd (generation) each layer gathers its rows' factors once per route, not once per decode
    step: layer id -> (A rows, scale * B rows)."""
    keep: torch.Tensor | None = None
    """Training with dropout: [n_active, tokens, sum of the wrapped layers' in_features] keep-mask (1/0 in uint8 on
    a CPU, bool on a GPU), each row's part drawn from its own seed (see
    `MultiLora.dropout_mask`), so a row's mask never depends on which other rows share its batch."""
    cast: tuple[torch.Tensor, torch.Tensor] | None = None
    """(a layer input, its rows as the LoRA path reads them): `q_proj` and `v_proj` read the same hidden states, so
    the second reuses the first's fp32 copy instead of making (and, in training, keeping for backward) its own."""


class MultiLoraLinear(nn.Module):
    """`base(x) + scale[s] * dropout(x) @ A[s] @ B[s]` where `s` is the slot of x's batch row."""

    def __init__(self, base: nn.Linear, capacity: int, r: int, owner: MultiLora, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise MultiLoraError(f"multi-LoRA wraps nn.Linear layers, got {type(base).__name__}")
        self.base = base
        weight = base.weight
        dtype = factor_dtype(weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(capacity, base.in_features, r, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(capacity, r, base.out_features, dtype=dtype, device=weight.device))
        self.dropout = nn.Dropout(dropout)
        self.offset = 0
        """Where this layer's columns start in a route's keep-mask (set by the owner)."""
        # A plain attribute, not a submodule: the owner must not appear in this module's state dict.
        object.__setattr__(self, "_owner", owner)

    def _drop(self, flat: torch.Tensor, route: Route) -> tuple[torch.Tensor, float]:
        """LoRA dropout on the routed rows' input, as (x with the dropped elements zeroed, the factor still owed):
        per-row seeded masks when the route has them (multi-user training), the global RNG otherwise (plain
        `nn.Dropout`, e.g. a caller's own training loop). With a route's mask the 1/(1-p) rescale is owed: the
        caller applies it to the rank-r intermediate (r/in of the work). Backward keeps a view of the route's mask,
        not a copy of it per module."""
        p = self.dropout.p
        if not self.training or p == 0:
            return flat, 1.0
        if route.keep is None:
            return self.dropout(flat), 1.0
        keep = route.keep[:, :flat.shape[1], self.offset:self.offset + flat.shape[-1]]
        dropped = torch.where(keep, flat, 0.0) if keep.dtype == torch.bool else flat * keep
        return dropped, 1.0 / (1.0 - p)

    def _lora_input(self, x: torch.Tensor, xs: torch.Tensor, route: Route) -> torch.Tensor:
        """The routed rows `xs` of `x` in the factors' dtype, shared with the previous module that read this same
        `x` (a compiled graph makes its own: Dynamo would have to guard on the tensor's identity)."""
        if route.cast is not None and route.cast[0] is x and not torch.compiler.is_compiling():
            return route.cast[1]
        flat = xs.reshape(xs.shape[0], -1, xs.shape[-1]).to(self.lora_A.dtype)
        if not torch.compiler.is_compiling():
            route.cast = (x, flat)
        return flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        route = self._owner.active_route
        if route is None or route.slots.numel() == 0:
            return out
        if x.shape[0] != route.n_rows:
            raise MultiLoraError(f"batch has {x.shape[0]} rows but the route was set for {route.n_rows}: "
                                 "call route() with one adapter per row of this batch")
        xs = x if route.rows is None else x.index_select(0, route.rows)
        # The LoRA path runs in the factors' dtype (fp32 over a 16-bit base), as PEFT casts its input to
        # lora_A's dtype: better rounding, and on an NVIDIA H200 GPU training with bf16 LoRA matmuls measured 2.5x
        # slower than in fp32 while PEFT's path was not (docs/bench-log/2026-11-26-0710-gpu-h200-bf16.md; the
        # small-N batched bf16 matmuls are the suspect, not profiled). Only the [rows, tokens, out] sum goes back
        # to the base's dtype.
        flat = self._lora_input(x, xs, route)  # [rows, tokens, in]
        if route.gathered is None or torch.is_grad_enabled():  # autograd must see the gather
            # Gather as a one-hot matmul: exact, and its backward is one small matmul, where index_select's
            # backward (zeros + scatter_add into the whole stacked tensor) cost ~10% of a training step.
            a = (route.onehot @ self.lora_A.flatten(1)).view(-1, *self.lora_A.shape[1:])
            b = (route.onehot @ self.lora_B.flatten(1)).view(-1, *self.lora_B.shape[1:])
            # Scale (and rescale for dropout) the rank-r intermediate, not the [rows, tokens, out] result: r/out of
            # the work.
            dropped, rescale = self._drop(flat, route)
            delta = torch.bmm(torch.bmm(dropped, a) * (route.scale * rescale), b)
        else:
            pair = route.gathered.get(id(self))
            if pair is None:
                pair = (self.lora_A.index_select(0, route.slots),
                        self.lora_B.index_select(0, route.slots) * route.scale)
                route.gathered[id(self)] = pair
            dropped, rescale = self._drop(flat, route)
            inner = torch.bmm(dropped, pair[0])
            delta = torch.bmm(inner if rescale == 1.0 else inner * rescale, pair[1])
        delta = delta.reshape(*xs.shape[:-1], delta.shape[-1]).to(out.dtype)
        if route.rows is None:
            return out + delta
        return out.index_add(0, route.rows, delta)
