"""Model surgery for gathered multi-LoRA: `MultiLora` swaps every targeted `nn.Linear` of a causal LM for a
`MultiLoraLinear`, holds the adapters' slots by name (add, load, export, save, remove), and routes each batch row
to one slot (or none). Adapters move in and out as standard PEFT folders / state dicts (`adapter_config.json`,
`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`), so they are interchangeable with
`peft` and with `oppu.model.AdapterPool` folders.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oppu.multilora.layer import MultiLoraError, MultiLoraLinear, Route, factor_dtype

NO_ADAPTER = -1
"""Row slot meaning 'base model only'."""

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


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
        self.active_route: Route | None = None
        """The route every wrapped layer reads in its forward (None: base model only); `route()` sets it for a
        block, the decoder and the trainer set it per batch."""
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
        cfg, state = read_lora_folder(folder, "can be batched; serve it with oppu.model.AdapterPool")
        return self.load_state_dict(name, state, alpha=float(cfg["lora_alpha"]), r=int(cfg["r"]),
                                    use_rslora=bool(cfg.get("use_rslora")))

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
        import peft
        from safetensors.torch import save_file

        from oppu.manifest import stamp_created, write_manifest
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
                write_manifest(tmp, stamp_created({**manifest, "adapter_name": name, "peft_kind": "lora"}))
        return folder

    # -- routing --
    def make_route(self, slots: Sequence[int]) -> Route:
        device = self.scaling.device
        all_slots = torch.tensor(list(slots), dtype=torch.long, device=device)
        active = all_slots >= 0
        rows = None if bool(active.all()) else active.nonzero().flatten()
        routed = all_slots if rows is None else all_slots[rows]
        onehot = torch.zeros(len(routed), self.capacity, dtype=self.scaling.dtype, device=device)
        onehot[torch.arange(len(routed), device=device), routed] = 1.0
        return Route(n_rows=len(slots), slots=routed, rows=rows, scale=self.scaling[routed].view(-1, 1, 1),
                      onehot=onehot, gathered=None if torch.is_grad_enabled() else {})

    def dropout_mask(self, seeds: Sequence[int], lengths: Sequence[int], width: int) -> torch.Tensor | None:
        """Keep-mask [rows, width, columns of every wrapped layer] for LoRA dropout in training, or None.

        Row i's first `lengths[i]` positions come from `seeds[i]` alone (on a CPU `row_keep_mask`, on a GPU a
        generator of that device; the rest, right padding, is kept: nothing reads it). A row's mask is therefore
        the same whatever rows share the batch, and a user's adapter trained among others equals the one trained
        alone with the same seeds. PEFT draws its masks from the global RNG over the whole batch, which would tie
        each user to its batch companions.

        On a CPU the mask is 1/0 in uint8 (a byte per element, as bool), which each layer multiplies its input by:
        torch's CPU `where` is slower (~100 us against ~30 us for one 3 x 128 x 576 slice, 60 slices a step, the
        same again in backward). On a GPU it stays bool and takes `where`.
        """
        if self.dropout == 0:
            return None
        device = self.scaling.device
        on_cpu = device.type == "cpu"
        keep = torch.ones(len(seeds), width, self._mask_width, dtype=torch.uint8 if on_cpu else torch.bool,
                          device=device)
        for i, (seed, length) in enumerate(zip(seeds, lengths, strict=True)):
            if on_cpu:
                keep[i, :length] = row_keep_mask(int(seed), length, self._mask_width, self.dropout)
            else:  # drawn where it is used: too much to draw on the host
                gen = torch.Generator(device=device).manual_seed(int(seed))
                keep[i, :length] = torch.rand(length, self._mask_width, generator=gen, device=device) >= self.dropout
        return keep

    def slots_of(self, adapters: Sequence[str | None]) -> list[int]:
        return [NO_ADAPTER if a is None else self.slot(a) for a in adapters]

    @contextlib.contextmanager
    def route(self, adapters: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row i runs with adapter `adapters[i]` (None = base model only)."""
        previous = self.active_route
        self.active_route = self.make_route(self.slots_of(adapters))
        try:
            yield
        finally:
            self.active_route = previous

    def unwrap(self) -> nn.Module:
        """Put the original nn.Linear layers back and return the plain model."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer.base)
        self.layers = {}
        return self.model


DROP_RESOLUTION = 1 << 16
"""A dropout mask compares 16 random bits per element against round(p * 2^16), so the drop rate is p to 1/65536
(0.05 -> 3277/65536 = 0.050003)."""


def row_keep_mask(seed: int, length: int, columns: int, p: float) -> torch.Tensor:
    """Keep-mask [length, columns] (bool) of one training row, a function of `seed` alone: each element is dropped
    with probability p (to `DROP_RESOLUTION`). 16 random bits per element, read straight from numpy's SFC64 as
    raw 64-bit outputs (four elements each): for a 128-token row of SmolLM2-135M's 34,560 columns ~2 ms, against
    ~13 ms for the same bits through `Generator.bytes` (which copies them into a Python bytes object; the masks
    are equal) and ~26 ms for torch's float `rand`, with which a 16-user run spent ~20 s of its training drawing
    masks."""
    import numpy as np

    n = length * columns
    bits = np.random.SFC64(seed).random_raw(-(-n // 4)).view(np.uint16)[:n]
    keep = bits >= round(p * DROP_RESOLUTION)
    return torch.from_numpy(keep.reshape(length, columns))


def read_lora_folder(folder: str | Path, only: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config, state dict) of a plain PEFT LoRA folder; MultiLoraError for anything else. `only` ends the
    refusal's message: what a plain LoRA is needed for here (batching, a task-adapted base merge)."""
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
                             f"rank/alpha patterns) {only}")
    return cfg, load_file(str(weights_path))
