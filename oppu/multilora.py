"""Many users' LoRA adapters served and trained in ONE batch (issue #7): gathered multi-LoRA layers.

Scope:
- `MultiLora` does the model surgery: every targeted `nn.Linear` (q_proj, v_proj, ...) becomes a
  `MultiLoraLinear` holding the frozen base weight plus stacked per-slot factors A [slots, in, r] and
  B [slots, r, out]. Each batch row is routed to one slot (or none), and the layer adds
  `scale[slot] * x @ A[slot] @ B[slot]` with two batched matmuls over gathered factors (S-LoRA/Punica style),
  the same code for prefill and for the KV-cached one-token decode step.
- Adapters move in and out as standard PEFT folders / state dicts (`adapter_config.json`,
  `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`), so they are interchangeable
  with `peft` (and with `oppu.model.AdapterPool` folders).
- `generate_multi`: greedy, left-padded, KV-cached decoding of a mixed-user batch; a row leaves the batch (and
  the cache) as soon as it emits an end token, so short answers stop costing compute.
- `train_users_batched`: rows of many users in one forward/backward. Each user's loss is the mean over that
  user's answer tokens, the total is the sum over users, so a slot only ever receives gradient from its own
  user's rows; clipping and AdamW run per slot with per-user step counts, so every user's adapter ends up as if
  it had been trained alone on the same batches.

Llama-style causal LMs (a decoder at `model.get_decoder()`, a linear `lm_head`) are what this is written and
tested for. No I/O besides adapter folders; no Streamlit.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oppu.generate import DEFAULT_MAX_PROMPT_TOKENS, left_pad
from oppu.train import length_chunks, linear_schedule, make_batches, right_pad, tokens_per_forward_for

__all__ = ["MultiLora", "MultiLoraError", "TrainExample", "generate_ids", "generate_multi", "greedy",
           "linear_schedule", "make_batches", "sampler", "train_users", "train_users_batched"]

NO_ADAPTER = -1
"""Row slot meaning 'base model only'."""
IGNORE_INDEX = -100
"""Label of a token that carries no loss (prompt and padding), as in Hugging Face."""

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class MultiLoraError(ValueError):
    """Misuse of the multi-LoRA layer (unknown adapter, wrong rank, bad folder); the message says the fix."""


# -- the per-module maths ---------------------------------------------------------------------------------------
def factor_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """LoRA factors are trained and kept in fp32 over a 16-bit base (as PEFT's `autocast_adapter_dtype` does):
    AdamW steps of ~lr on factors of ~1e-2 would mostly round away in bf16."""
    return torch.float32 if weight_dtype in (torch.bfloat16, torch.float16) else weight_dtype


@dataclass
class _Route:
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
    """Training with dropout: [n_active, tokens, sum of the wrapped layers' in_features] keep-mask (bool), each
    row's part drawn from its own seed (see `MultiLora.dropout_mask`), so a row's mask never depends on which
    other rows share its batch."""


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

    def _drop(self, flat: torch.Tensor, route: _Route) -> torch.Tensor:
        """LoRA dropout on the routed rows' input: per-row seeded masks when the route has them (multi-user
        training), the global RNG otherwise (plain `nn.Dropout`, e.g. a caller's own training loop)."""
        p = self.dropout.p
        if not self.training or p == 0:
            return flat
        if route.keep is None:
            return self.dropout(flat)
        keep = route.keep[:, :flat.shape[1], self.offset:self.offset + flat.shape[-1]]
        return flat * keep.to(flat.dtype) * (1.0 / (1.0 - p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        route = self._owner._route
        if route is None or route.slots.numel() == 0:
            return out
        if x.shape[0] != route.n_rows:
            raise MultiLoraError(f"batch has {x.shape[0]} rows but the route was set for {route.n_rows}: "
                                 "call route() with one adapter per row of this batch")
        xs = x if route.rows is None else x.index_select(0, route.rows)
        # The LoRA path runs in the factors' dtype (fp32 over a 16-bit base), as PEFT casts its input to
        # lora_A's dtype: better rounding, and on the H200 the path with bf16 LoRA matmuls measured 2.5-5x slower
        # than in fp32 while PEFT's paths were not (docs/PERFORMANCE.md; the small-N batched bf16 matmuls are the
        # suspect, not profiled). Only the [rows, tokens, out] sum goes back to the base's dtype.
        flat = xs.reshape(xs.shape[0], -1, xs.shape[-1]).to(self.lora_A.dtype)  # [rows, tokens, in]
        if route.gathered is None or torch.is_grad_enabled():  # autograd must see the gather
            # Gather as a one-hot matmul: exact, and its backward is one small matmul, where index_select's
            # backward (zeros + scatter_add into the whole stacked tensor) cost ~10% of a training step.
            a = (route.onehot @ self.lora_A.flatten(1)).view(-1, *self.lora_A.shape[1:])
            b = (route.onehot @ self.lora_B.flatten(1)).view(-1, *self.lora_B.shape[1:])
            # Scale the rank-r intermediate, not the [rows, tokens, out] result: r/out of the work.
            delta = torch.bmm(torch.bmm(self._drop(flat, route), a) * route.scale, b)
        else:
            pair = route.gathered.get(id(self))
            if pair is None:
                pair = (self.lora_A.index_select(0, route.slots),
                        self.lora_B.index_select(0, route.slots) * route.scale)
                route.gathered[id(self)] = pair
            delta = torch.bmm(torch.bmm(self._drop(flat, route), pair[0]), pair[1])
        delta = delta.reshape(*xs.shape[:-1], delta.shape[-1]).to(out.dtype)
        if route.rows is None:
            return out + delta
        return out.index_add(0, route.rows, delta)


# -- model surgery, slots and PEFT interchange ----------------------------------------------------------------
class MultiLora:
    """Stacked LoRA slots on one causal LM: add/load/export/remove adapters by name, route rows to them.

    `capacity` slots are allocated up front (grown on demand when not training); `r` is the largest rank a
    slot holds (lower-rank adapters are zero-padded, which leaves their output unchanged). Each slot has its own
    scaling (alpha/r, or alpha/sqrt(r) for rsLoRA), so adapters with different alphas can share a batch.
    """

    def __init__(self, model: nn.Module, *, capacity: int = 8, r: int = 8, alpha: float = 8.0,
                 target_modules: Sequence[str] = ("q_proj", "v_proj"), dropout: float = 0.0):
        if capacity < 1 or r < 1:
            raise MultiLoraError(f"capacity and r must be >= 1 (got capacity={capacity}, r={r})")
        self.model = model
        self.r = r
        self.alpha = float(alpha)
        self.target_modules = tuple(target_modules)
        self.dropout = dropout
        self._route: _Route | None = None
        self._slots: dict[str, int] = {}
        self.layers: dict[str, MultiLoraLinear] = {}
        weight = next(model.parameters())
        self.scaling = torch.zeros(capacity, dtype=factor_dtype(weight.dtype), device=weight.device)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.split(".")[-1] in self.target_modules:
                self.layers[name] = MultiLoraLinear(module, capacity, r, self, dropout)
        if not self.layers:
            raise MultiLoraError(f"no nn.Linear named {list(self.target_modules)} in the model: pass the "
                                 "projection names of this architecture as target_modules")
        offset = 0
        for name, layer in self.layers.items():
            layer.offset = offset
            offset += layer.base.in_features
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        self._mask_width = offset

    @classmethod
    def from_peft_config(cls, model: nn.Module, cfg, capacity: int = 8) -> MultiLora:
        """Build from our `oppu.config.PeftConfig` (kind must be `lora`)."""
        if cfg.kind != "lora":
            raise MultiLoraError(f"multi-LoRA batching serves LoRA adapters only, not {cfg.kind!r}: use "
                                 "oppu.model.AdapterPool for IA3 and prompt tuning")
        return cls(model, capacity=capacity, r=cfg.r, alpha=cfg.alpha, target_modules=cfg.target_modules,
                   dropout=cfg.dropout)

    # -- slots --
    @property
    def capacity(self) -> int:
        return int(self.scaling.shape[0])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def slot(self, name: str) -> int:
        if name not in self._slots:
            raise MultiLoraError(f"no adapter named {name!r}: add() or load() it first "
                                 f"(held: {', '.join(self._slots) or 'none'})")
        return self._slots[name]

    def parameters(self) -> list[nn.Parameter]:
        """The stacked factors of every layer (A then B per layer), the only tensors training updates."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def _grow(self, capacity: int) -> None:
        if any(p.grad is not None for p in self.parameters()):
            raise MultiLoraError("cannot add adapter slots while gradients are held (during training): "
                                 "create the MultiLora with enough capacity for every trained user")
        extra = capacity - self.capacity
        for layer in self.layers.values():
            for pname in ("lora_A", "lora_B"):
                old = getattr(layer, pname)
                pad = torch.zeros(extra, *old.shape[1:], dtype=old.dtype, device=old.device)
                setattr(layer, pname, nn.Parameter(torch.cat([old.detach(), pad]),
                                                   requires_grad=old.requires_grad))
        self.scaling = torch.cat([self.scaling, self.scaling.new_zeros(extra)])

    def _claim(self, name: str) -> int:
        if name in self._slots:
            return self._slots[name]
        used = set(self._slots.values())
        free = next((i for i in range(self.capacity) if i not in used), None)
        if free is None:
            free = self.capacity
            self._grow(max(2 * self.capacity, free + 1))
        self._slots[name] = free
        return free

    @torch.no_grad()
    def add(self, name: str, *, seed: int = 0, alpha: float | None = None) -> int:
        """A fresh adapter initialised as PEFT does (A Kaiming-uniform, B zero), reproducible from `seed`."""
        slot = self._claim(name)
        gen = torch.Generator().manual_seed(seed)
        for layer in self.layers.values():
            a = torch.empty(self.r, layer.base.in_features)
            # PEFT's default: kaiming_uniform_(a=sqrt(5)) on the [r, in] weight -> bound 1/sqrt(in).
            bound = 1.0 / math.sqrt(layer.base.in_features)
            a.uniform_(-bound, bound, generator=gen)
            layer.lora_A[slot] = a.T.to(layer.lora_A.dtype)
            layer.lora_B[slot].zero_()
        self.scaling[slot] = (self.alpha if alpha is None else float(alpha)) / self.r
        return slot

    def remove(self, name: str) -> None:
        slot = self.slot(name)
        del self._slots[name]
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_A[slot].zero_()
                layer.lora_B[slot].zero_()
            self.scaling[slot] = 0.0

    @torch.no_grad()
    def load_state_dict(self, name: str, state: Mapping[str, torch.Tensor], *, alpha: float, r: int,
                        use_rslora: bool = False) -> int:
        """Load a PEFT LoRA state dict (keys `base_model.model.<module>.lora_A.weight`, adapter name optional)."""
        if r > self.r:
            raise MultiLoraError(f"adapter {name!r} has rank {r} but slots hold rank <= {self.r}: build the "
                                 f"MultiLora with r={r}")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = _PEFT_KEY.match(key)
            if match is None:
                raise MultiLoraError(f"unexpected key {key!r} in adapter {name!r}: only LoRA A/B weights "
                                     "(no bias, DoRA or embeddings) can be served in a multi-LoRA batch")
            pairs.setdefault(match["module"], {})[match["ab"]] = tensor
        unknown = sorted(set(pairs) - set(self.layers))
        if unknown:
            raise MultiLoraError(f"adapter {name!r} targets modules this MultiLora does not wrap: {unknown[:4]}; "
                                 f"build it with target_modules covering them (now {list(self.target_modules)})")
        slot = self._claim(name)
        for module, layer in self.layers.items():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            if module not in pairs:
                continue
            a, b = pairs[module].get("A"), pairs[module].get("B")
            if a is None or b is None or a.shape != (r, layer.base.in_features) \
                    or b.shape != (layer.base.out_features, r):
                raise MultiLoraError(f"adapter {name!r}, module {module}: expected lora_A [{r}, "
                                     f"{layer.base.in_features}] and lora_B [{layer.base.out_features}, {r}]")
            layer.lora_A[slot, :, :r] = a.T.to(layer.lora_A.dtype)
            layer.lora_B[slot, :r, :] = b.T.to(layer.lora_B.dtype)
        self.scaling[slot] = alpha / (math.sqrt(r) if use_rslora else r)
        return slot

    def load(self, name: str, folder: str | Path) -> int:
        """Load a standard PEFT LoRA adapter folder (what `PeftModel.save_pretrained` writes)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise MultiLoraError(f"{folder} is not a PEFT adapter folder: it needs adapter_config.json and "
                                 "adapter_model.safetensors")
        cfg = json.loads(config_path.read_text())
        unsupported = {"peft_type": cfg.get("peft_type") not in ("LORA", None),
                       "use_dora": bool(cfg.get("use_dora")), "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
                       "rank_pattern": bool(cfg.get("rank_pattern")), "alpha_pattern": bool(cfg.get("alpha_pattern")),
                       "bias": cfg.get("bias", "none") != "none"}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise MultiLoraError(f"adapter {folder} uses {bad}: only plain LoRA (no DoRA, bias, per-module "
                                 "rank/alpha patterns) can be batched; serve it with oppu.model.AdapterPool")
        return self.load_state_dict(name, load_file(str(weights_path)), alpha=float(cfg["lora_alpha"]),
                                    r=int(cfg["r"]), use_rslora=bool(cfg.get("use_rslora")))

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter as PEFT saves it: `base_model.model.<module>.lora_{A,B}.weight`, rank `self.r`."""
        slot = self.slot(name)
        out: dict[str, torch.Tensor] = {}
        for module, layer in self.layers.items():
            out[f"base_model.model.{module}.lora_A.weight"] = layer.lora_A[slot].detach().T.contiguous().cpu()
            out[f"base_model.model.{module}.lora_B.weight"] = layer.lora_B[slot].detach().T.contiguous().cpu()
        return out

    def alpha_of(self, name: str) -> float:
        return float(self.scaling[self.slot(name)]) * self.r

    def save(self, name: str, folder: str | Path, manifest: Mapping[str, Any] | None = None) -> Path:
        """Write `name` as a standard PEFT adapter folder that `PeftModel.from_pretrained` loads.

        Atomic (a temporary sibling folder renamed into place), so a reader never sees half an adapter; with a
        `manifest`, `manifest.json` is written beside it as `oppu.model.save_user_adapter` does.
        """
        import time

        import peft
        from safetensors.torch import save_file

        from oppu.paths import atomic_folder

        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            config = peft.LoraConfig(r=self.r, lora_alpha=self.alpha_of(name), lora_dropout=self.dropout,
                                     target_modules=sorted({m.split(".")[-1] for m in self.layers}), bias="none",
                                     task_type="CAUSAL_LM",
                                     base_model_name_or_path=getattr(self.model.config, "_name_or_path", None))
            config.save_pretrained(str(tmp))
            save_file(self.state_dict(name), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            if manifest is not None:
                body = {**manifest, "adapter_name": name, "peft_kind": "lora",
                        "created": manifest.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                (tmp / "manifest.json").write_text(json.dumps(body, indent=1, sort_keys=True, default=str))
        return folder

    # -- routing --
    def _make_route(self, slots: Sequence[int]) -> _Route:
        device = self.scaling.device
        all_slots = torch.tensor(list(slots), dtype=torch.long, device=device)
        active = all_slots >= 0
        rows = None if bool(active.all()) else active.nonzero().flatten()
        routed = all_slots if rows is None else all_slots[rows]
        onehot = torch.zeros(len(routed), self.capacity, dtype=self.scaling.dtype, device=device)
        onehot[torch.arange(len(routed), device=device), routed] = 1.0
        return _Route(n_rows=len(slots), slots=routed, rows=rows, scale=self.scaling[routed].view(-1, 1, 1),
                      onehot=onehot, gathered=None if torch.is_grad_enabled() else {})

    def dropout_mask(self, seeds: Sequence[int], lengths: Sequence[int], width: int) -> torch.Tensor | None:
        """Keep-mask [rows, width, columns of every wrapped layer] for LoRA dropout in training, or None.

        Row i's first `lengths[i]` positions come from a generator seeded with `seeds[i]` alone (the rest, right
        padding, is kept: nothing reads it). A row's mask is therefore the same whatever rows share the batch,
        and a user's adapter trained among others equals the one trained alone with the same seeds. PEFT draws
        its masks from the global RNG over the whole batch, which would tie each user to its batch companions.
        """
        if self.dropout == 0:
            return None
        device = self.scaling.device
        keep = torch.ones(len(seeds), width, self._mask_width, dtype=torch.bool, device=device)
        for i, (seed, length) in enumerate(zip(seeds, lengths, strict=True)):
            gen = torch.Generator(device=device).manual_seed(int(seed))
            keep[i, :length] = torch.rand(length, self._mask_width, generator=gen, device=device) >= self.dropout
        return keep

    def slots_of(self, adapters: Sequence[str | None]) -> list[int]:
        return [NO_ADAPTER if a is None else self.slot(a) for a in adapters]

    @contextlib.contextmanager
    def route(self, adapters: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row i runs with adapter `adapters[i]` (None = base model only)."""
        previous = self._route
        self._route = self._make_route(self.slots_of(adapters))
        try:
            yield
        finally:
            self._route = previous

    def unwrap(self) -> nn.Module:
        """Put the original nn.Linear layers back and return the plain model."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer.base)
        self.layers = {}
        return self.model


# -- generation -----------------------------------------------------------------------------------------------
def _cache_kwarg(model) -> str:
    # transformers renamed `past_key_values` to `cache` during 5.x; pass whichever this version expects.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _keep_rows(cache, keep: torch.Tensor, lead: int) -> None:
    """Drop finished rows and the left-padding columns no remaining row needs from every cache layer."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        layer.keys = layer.keys[keep, :, lead:]
        layer.values = layer.values[keep, :, lead:]


Pick = Callable[[torch.Tensor], torch.Tensor]
"""Next token of each row from its last logits [rows, vocab] (greedy: argmax)."""


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def sampler(temperature: float, top_k: int, top_p: float, seed: int, device: torch.device | str = "cpu") -> Pick:
    """Seeded sampling in Hugging Face's order (temperature, then top-k, then top-p nucleus, at least one token
    kept), with its own generator: the same seed and batches give the same answers, whatever else ran before."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float() / temperature
        if top_k > 0:
            kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1.0:
            ordered, index = scores.sort(dim=-1)
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[:, -1] = False
            scores = scores.masked_fill(drop.scatter(1, index, drop), float("-inf"))
        return torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(1)

    return pick


@torch.inference_mode()
def _decode_batch(ml: MultiLora, rows: Sequence[Sequence[int]], slots: Sequence[int], max_new_tokens: int,
                  eos: torch.Tensor, pad_id: int, pick: Pick = greedy) -> list[list[int]]:
    from transformers import DynamicCache

    model = ml.model
    ids, mask = left_pad(rows, pad_id, ml.scaling.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_kwarg(model)
    alive = list(range(len(rows)))
    alive_slots = list(slots)
    out: list[list[int]] = [[] for _ in rows]
    previous = ml._route
    try:
        ml._route = ml._make_route(alive_slots)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]
        next_pos = positions[:, -1] + 1
        for step in range(max_new_tokens):
            token = pick(logits)
            done = torch.isin(token, eos)
            for i, t in zip(alive, token.tolist(), strict=True):
                out[i].append(t)
            if step == max_new_tokens - 1:
                break
            if bool(done.any()):
                keep = (~done).nonzero().flatten()
                if keep.numel() == 0:
                    break
                alive = [alive[i] for i in keep.tolist()]
                alive_slots = [alive_slots[i] for i in keep.tolist()]
                mask, token, next_pos = mask[keep], token[keep], next_pos[keep]
                lead = int(mask.any(0).nonzero()[0])  # leading columns that are padding in every remaining row
                mask = mask[:, lead:]
                _keep_rows(cache, keep, lead)
                ml._route = ml._make_route(alive_slots)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                           use_cache=True, **{cache_kw: cache}).logits[:, -1]
            next_pos = next_pos + 1
    finally:
        ml._route = previous
    eos_set = set(eos.tolist())
    return [[t for t in row if t not in eos_set] for row in out]


def generate_ids(ml: MultiLora, rows: Sequence[Sequence[int]], adapters: Sequence[str | None],
                 max_new_tokens: int, eos_token_ids: Sequence[int], pad_id: int,
                 batch_size: int = 64, pick: Pick = greedy) -> list[list[int]]:
    """New-token ids for each prompt (ids), row i with adapter `adapters[i]`; end tokens not included.

    Greedy unless `pick` says otherwise (`sampler(...)`). Rows are sorted by length into batches of `batch_size`
    (less padding) and returned in input order.
    """
    if len(rows) != len(adapters):
        raise MultiLoraError(f"{len(rows)} prompts but {len(adapters)} adapters: pass one (or None) per prompt")
    if any(len(r) == 0 for r in rows):
        raise MultiLoraError("an empty prompt cannot be generated from: every prompt needs at least one token")
    if max_new_tokens < 1 or not eos_token_ids:
        raise MultiLoraError("max_new_tokens must be >= 1 and at least one end token id must be given")
    slots = ml.slots_of(adapters)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=ml.scaling.device)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    result: list[list[int]] = [[] for _ in rows]
    was_training = ml.model.training
    ml.model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            new = _decode_batch(ml, [rows[i] for i in batch], [slots[i] for i in batch], max_new_tokens,
                                eos, pad_id, pick)
            for i, tokens in zip(batch, new, strict=True):
                result[i] = tokens
    finally:
        ml.model.train(was_training)
    return result


def generate_multi(ml: MultiLora, tokenizer, prompts: Sequence[str], adapter_ids: Sequence[str | None],
                   max_new_tokens: int, eos_token_ids: Sequence[int] | None = None, *, batch_size: int = 64,
                   max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, pick: Pick = greedy) -> list[str]:
    """Answer user-message prompts (greedily by default), row i with adapter `adapter_ids[i]`: a drop-in for the
    LoRA path of `oppu.generate.generate` (same chat wrapping and truncation, same end tokens, only new tokens
    decoded)."""
    from oppu.generate import encode_prompt
    from oppu.model import eos_token_ids as default_eos

    eos = list(eos_token_ids) if eos_token_ids is not None else default_eos(tokenizer, ml.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    rows = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    new = generate_ids(ml, rows, adapter_ids, max_new_tokens, eos, pad_id, batch_size, pick)
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new]


# -- multi-user training ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainExample:
    """One tokenized training sequence: the loss falls on positions whose label is not IGNORE_INDEX."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels) or len(self.input_ids) < 2:
            raise MultiLoraError("a training example needs >= 2 tokens and one label per token")


class _SlotAdamW:
    """AdamW over stacked [slot, ...] tensors where only the slots given to `step` move.

    Equal, slot by slot, to one `torch.optim.AdamW` per user: each slot counts its own steps (bias correction)
    and has its own learning rate, and a slot absent from a step gets no update (not even weight decay).
    """

    def __init__(self, params: Sequence[nn.Parameter], betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.b1, self.b2 = betas
        self.eps, self.wd = eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(self.params[0].shape[0], dtype=torch.long, device=self.params[0].device)

    @torch.no_grad()
    def step(self, slots: torch.Tensor, lrs: torch.Tensor) -> None:
        self.steps[slots] += 1
        t = self.steps[slots].double()
        lr = lrs.double()
        # Per-slot scalars computed in double as torch's AdamW does with Python floats.
        decay = (1.0 - lr * self.wd)
        step_size = lr / (1.0 - self.b1 ** t)
        bc2_sqrt = torch.sqrt(1.0 - self.b2 ** t)
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            view = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad.index_select(0, slots)
            mp, vp, pp = m.index_select(0, slots), v.index_select(0, slots), p.index_select(0, slots)
            pp.mul_(decay.to(p.dtype).view(view))
            mp.lerp_(g, 1 - self.b1)
            vp.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (vp.sqrt() / bc2_sqrt.to(p.dtype).view(view)).add_(self.eps)
            pp.sub_(step_size.to(p.dtype).view(view) * mp / denom)
            p.index_copy_(0, slots, pp)
            m.index_copy_(0, slots, mp)
            v.index_copy_(0, slots, vp)


def _clip_per_slot(params: Sequence[nn.Parameter], slots: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each slot's gradient to norm <= max_norm, as `clip_grad_norm_` does on one user's parameters.

    One global clip over the stacked tensors would couple users (B's large gradient would shrink A's step).
    """
    sq = sum(p.grad.index_select(0, slots).pow(2).flatten(1).sum(1) for p in params)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        view = (-1,) + (1,) * (p.dim() - 1)
        p.grad.index_copy_(0, slots, p.grad.index_select(0, slots) * coef.view(view))
    return norms


def row_seed(seed: int, step: int, index: int) -> int:
    """Dropout seed of the `index`-th row of a user's `step`-th batch (that user's own step count): a function of
    the run seed and the row's place in its user's training alone, never of the other users in the batch."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _step_loss(ml: MultiLora, rows: Sequence[TrainExample], row_slots: Sequence[int], weights: torch.Tensor,
               pad_id: int, seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Forward + backward of one chunk; returns each row's weighted loss (detached)."""
    model, device = ml.model, ml.scaling.device
    # right padding: causal attention never looks at it
    ids, mask, labels = right_pad([(r.input_ids, r.labels) for r in rows], pad_id, device)
    width = ids.shape[1]
    ml._route = ml._make_route(row_slots)
    if seeds is not None and ml._route.rows is None:  # training routes every row (no base-only rows)
        ml._route.keep = ml.dropout_mask(seeds, [len(r.input_ids) for r in rows], width)
    try:
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        ml._route = None
    targets = labels[:, 1:]
    picked = targets != IGNORE_INDEX
    # Logits only where a loss falls: the vocabulary projection of every prompt token is pure waste.
    logits = model.get_output_embeddings()(hidden[:, :-1][picked]).float()
    losses = nn.functional.cross_entropy(logits, targets[picked], reduction="none")
    row_of_token = picked.nonzero()[:, 0]
    weighted = losses * weights.to(device)[row_of_token]
    weighted.sum().backward()
    return torch.zeros(len(rows), device=device).index_add(0, row_of_token, weighted.detach())


def train_users_batched(ml: MultiLora, batches: Mapping[str, Sequence[Sequence[TrainExample]]], *, lr: float,
                        weight_decay: float = 0.0, warmup_ratio: float = 0.0, max_grad_norm: float | None = 1.0,
                        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                        schedule: Callable[[int, int, int], float] = linear_schedule, pad_id: int = 0,
                        tokens_per_forward: int | None = None, seed: int = 0,
                        progress: Callable[[int, int, dict[str, float]], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> dict[str, list[float]]:
    """Train each named adapter on its own batches, all users' i-th batches in one step.

    `batches[user]` is that user's list of batches in order (e.g. from `make_batches`), exactly as a per-user
    loop would see them (an empty batch: the user sits that step out); adapters must already exist in `ml`
    (add() or load()). Step i runs every user with a non-empty i-th batch: each user's loss is the mean over its
    answer tokens in that batch, the step's loss their sum. Rows run in length-sorted chunks of at most
    `tokens_per_forward` padded tokens with gradient accumulation (this bounds activation memory, about 1.3 MB
    per token for SmolLM2-135M in fp32, and only changes float rounding; default: `oppu.train.tokens_per_forward_for`,
    as the per-user loop). Clipping, the learning-rate schedule
    (`schedule(step, total, warmup)`, warmup = int(warmup_ratio * total) as in `oppu.train.train_loop`) and
    AdamW are per user. LoRA dropout (the MultiLora's `dropout`) draws each row's mask from `seed`, the user's
    own step count and the row's index in its batch (`row_seed`), so it is also the same as training alone.
    Returns each user's loss per step.
    """
    tokens_per_forward = tokens_per_forward or tokens_per_forward_for(ml.model)
    users = list(batches)
    slots = {u: ml.slot(u) for u in users}
    # An empty batch means the user sits that step out (e.g. joins late); its own step count and schedule
    # only advance on the steps it takes part in, exactly as if it were trained alone.
    totals = {u: sum(1 for b in batches[u] if len(b) > 0) for u in users}
    warmups = {u: int(warmup_ratio * totals[u]) for u in users}
    taken = {u: 0 for u in users}
    params = ml.parameters()
    frozen = {id(p): p.requires_grad for p in ml.model.parameters()}
    for p in ml.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    opt = _SlotAdamW(params, betas=betas, eps=eps, weight_decay=weight_decay)
    history: dict[str, list[float]] = {u: [] for u in users}
    n_steps = max((len(b) for b in batches.values()), default=0)
    was_training = ml.model.training
    ml.model.train()
    try:
        for step in range(n_steps):
            if should_stop is not None and should_stop():
                break
            present = [u for u in users if step < len(batches[u]) and len(batches[u][step]) > 0]
            if not present:
                continue
            rows: list[TrainExample] = []
            row_user: list[str] = []
            seeds: list[int] = []
            for u in present:
                rows += list(batches[u][step])
                row_user += [u] * len(batches[u][step])
                seeds += [row_seed(seed, taken[u], j) for j in range(len(batches[u][step]))]
            answer_tokens = {u: 0 for u in present}
            for r, u in zip(rows, row_user, strict=True):
                answer_tokens[u] += sum(1 for t in r.labels[1:] if t != IGNORE_INDEX)
            empty = [u for u, n in answer_tokens.items() if n == 0]
            if empty:
                raise MultiLoraError(f"users {empty[:3]} have no answer tokens in batch {step}: every example "
                                     "needs labels other than IGNORE_INDEX after its first token")
            weights = torch.tensor([1.0 / answer_tokens[u] for u in row_user])
            per_row = torch.zeros(len(rows))
            for chunk in length_chunks([len(r.input_ids) for r in rows], tokens_per_forward):
                per_row[chunk] = _step_loss(ml, [rows[i] for i in chunk], [slots[row_user[i]] for i in chunk],
                                            weights[chunk], pad_id, [seeds[i] for i in chunk]).cpu()
            losses = {u: 0.0 for u in present}
            for value, u in zip(per_row.tolist(), row_user, strict=True):
                losses[u] += value
            active = torch.tensor([slots[u] for u in present], dtype=torch.long, device=ml.scaling.device)
            if max_grad_norm is not None:
                _clip_per_slot(params, active, max_grad_norm)
            lrs = torch.tensor([lr * schedule(taken[u], totals[u], warmups[u]) for u in present],
                               dtype=torch.float64, device=ml.scaling.device)
            opt.step(active, lrs)
            for p in params:
                p.grad = None
            for u in present:
                taken[u] += 1
                history[u].append(losses[u])
            if progress is not None:
                progress(step + 1, n_steps, losses)
    finally:
        ml._route = None
        ml.model.train(was_training)
        for p in params:
            p.grad = None
        for p in ml.model.parameters():
            if id(p) in frozen:
                p.requires_grad_(frozen[id(p)])
    return history


def train_users(ml: MultiLora, tokenizer, task, users: Sequence[Any], style, peft_cfg, train_cfg, *,
                histories: Mapping[str, Sequence[Any]] | None = None, retriever=None,
                profiles: Mapping[str, str | None] | None = None, adapter_keys: Mapping[str, str] | None = None,
                progress: Callable[[str, int, int, float], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Drop-in for `oppu.train.train_users` on a `MultiLora`: the same examples (built from each user alone by
    `oppu.examples.user_examples`), encoding, batch order, schedule and clipping, with all users in one loop.

    Each user's adapter is created fresh in `ml` under its adapter key (default: the user id), seeded by
    `train_cfg.seed` (PEFT's initial distribution, not its exact random draw). Returns `oppu.train.TrainResult`
    per user id; `progress(stage, step, total, loss)` is called once per step and user, with stage
    `user:<id>:<style>` as in `oppu.train`. Raises `oppu.train.StopRequested` when `should_stop()` turns true.
    """
    from oppu.examples import trained_items, user_examples
    from oppu.train import StopRequested, TrainResult, _pad_id, answer_end_ids, encode_example

    if peft_cfg.kind != "lora" or peft_cfg.r > ml.r:
        raise MultiLoraError(f"MultiLora trains LoRA adapters of rank <= {ml.r}, not {peft_cfg.kind} r={peft_cfg.r}")
    end_ids = answer_end_ids(tokenizer)
    batches: dict[str, list[list[TrainExample]]] = {}
    info: dict[str, tuple[str, list, list]] = {}  # adapter key -> (user id, examples, items)
    for user in users:
        uid = str(user.id)
        items = list(user.history if histories is None or uid not in histories else histories[uid])
        examples = user_examples(task, items, style, retriever, (profiles or {}).get(uid), train_cfg.max_examples,
                                 train_cfg.seed)
        key = (adapter_keys or {}).get(uid, uid)
        ml.add(key, seed=train_cfg.seed, alpha=peft_cfg.alpha)
        encoded = [TrainExample(*map(tuple, encode_example(tokenizer, ex, train_cfg.max_length, end_ids)))
                   for ex in examples]
        batches[key] = [[encoded[i] for i in batch] for batch in
                        make_batches(len(encoded), train_cfg.batch_size, train_cfg.epochs, train_cfg.seed)]
        info[key] = (uid, examples, items)
    stopped = []

    taken = dict.fromkeys(batches, 0)

    def report(step: int, total: int, losses: dict[str, float]) -> None:
        # Each user's own step of its own total, as the per-user loop reports it (users differ in batch counts).
        for key, loss in losses.items():
            taken[key] += 1
            if progress is not None:
                progress(f"user:{info[key][0]}:{style.key}", taken[key], len(batches[key]), loss)

    def stop() -> bool:
        if should_stop is not None and should_stop():
            stopped.append(True)
            return True
        return False

    history = train_users_batched(ml, batches, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                  warmup_ratio=train_cfg.warmup_ratio, max_grad_norm=1.0,
                                  pad_id=_pad_id(tokenizer), seed=train_cfg.seed, progress=report,
                                  should_stop=stop)
    if stopped:
        raise StopRequested("stopped between two multi-user training steps")
    results = {}
    for key, (uid, examples, items) in info.items():
        item_ids, data_hash = trained_items(task, items, examples)
        results[uid] = TrainResult(user_id=uid, adapter=key, curve=list(enumerate(history[key], start=1)),
                                   examples=len(examples), item_ids=item_ids, data_hash=data_hash)
    return results
