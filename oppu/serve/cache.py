"""Served adapters as slots of one `MultiLora`: loaded from disk on first use, evicted least recently used.

A served personal model is its user's LoRA on top of its task-adapted base. Both are LoRAs of the same base
model, so their sum is one LoRA of the summed rank: A = [A_task; A_user], B = [s_task B_task, s_user B_user]
(scalings folded into B, slot scaling 1). One slot then holds the whole personal model, and rows of different
users, tasks and prompt styles share a batch over the untouched base weights. The task-adapted base alone is a
slot with the task part only.

A slot in use by a decoding row is pinned; when every slot is pinned, a new model waits for one to free up.
Called only from the scheduler thread (no locking of its own).
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from oppu.errors import OppuError

PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
"""A PEFT LoRA weight name: `base_model.model.<module>.lora_A[.<adapter>].weight`."""

LoRA = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""{module name: (A [r, in], B [out, r] with the scaling folded in)}."""


class AdapterLoadError(OppuError, ValueError):
    """A served adapter folder could not be read or does not fit the served model."""


def read_lora(folder: str | Path) -> LoRA:
    """A plain PEFT LoRA folder as scaled factor pairs per module."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        weights = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot read the adapter in {folder}: {exc}") from exc
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("rank_pattern") \
            or cfg.get("alpha_pattern") or cfg.get("bias", "none") != "none":
        raise AdapterLoadError(f"{folder} is not a plain LoRA adapter: only plain LoRA adapters can be served")
    r = int(cfg["r"])
    scaling = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = PEFT_KEY.match(key)
        if match is None:
            raise AdapterLoadError(f"unexpected key {key!r} in {folder}: only LoRA A/B weights can be served")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    return {m: (ab["A"].float(), ab["B"].float() * scaling) for m, ab in pairs.items() if set(ab) == {"A", "B"}}


def combine(*loras: LoRA) -> tuple[dict[str, torch.Tensor], int]:
    """The sum of LoRAs as one PEFT state dict (scaling 1 when loaded with alpha = r) and its rank."""
    modules = sorted({m for lora in loras for m in lora})
    ranks = [max((a.shape[0] for a, _ in lora.values()), default=0) for lora in loras]
    total = sum(ranks)
    state: dict[str, torch.Tensor] = {}
    for module in modules:
        a_parts, b_parts = [], []
        shape = next(lora[module] for lora in loras if module in lora)
        n_in, n_out = shape[0].shape[1], shape[1].shape[0]
        for lora, r in zip(loras, ranks, strict=True):
            a, b = lora.get(module, (torch.zeros(0, n_in), torch.zeros(n_out, 0)))
            a_parts.append(torch.cat([a, a.new_zeros(r - a.shape[0], n_in)]))
            b_parts.append(torch.cat([b, b.new_zeros(n_out, r - b.shape[1])], dim=1))
        state[f"base_model.model.{module}.lora_A.weight"] = torch.cat(a_parts)
        state[f"base_model.model.{module}.lora_B.weight"] = torch.cat(b_parts, dim=1)
    return state, total


class AdapterCache:
    """LRU slots of served models on a `MultiLora` of `capacity` slots."""

    def __init__(self, ml, capacity: int, read: Callable[[str | Path], LoRA] = read_lora):
        self.ml = ml
        self.capacity = capacity
        self._read = read
        self._loras: OrderedDict[Path, LoRA] = OrderedDict()
        """Factors read from disk, by folder (a task LoRA is shared by all its users' slots)."""
        self._slots: OrderedDict[str, int] = OrderedDict()
        """slot key -> rows using it, least recently used first."""
        self.loads = self.hits = self.evictions = 0

    def _lora(self, folder: Path) -> LoRA:
        if folder not in self._loras:
            self._loras[folder] = self._read(folder)
            while len(self._loras) > 2 * self.capacity:
                self._loras.popitem(last=False)
        self._loras.move_to_end(folder)
        return self._loras[folder]

    def acquire(self, model) -> int | None:
        """The slot of `model` (a `ServedModel`), loaded if needed and pinned; None when every slot is pinned.
        `NO_ADAPTER` for the plain base."""
        from oppu.multilora import NO_ADAPTER

        key = model.slot_key
        if key is None:
            return NO_ADAPTER
        if key in self._slots:
            self._slots[key] += 1
            self._slots.move_to_end(key)
            self.hits += 1
            return self.ml.slot(key)
        if len(self._slots) >= self.capacity:
            idle = next((k for k, users in self._slots.items() if users == 0), None)
            if idle is None:
                return None
            self.ml.remove(idle)
            del self._slots[idle]
            self.evictions += 1
        parts = [self._lora(Path(f)) for f in (model.task_folder, model.adapter_folder) if f is not None]
        state, rank = combine(*parts)
        unknown = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in state} - set(self.ml.layers))
        if unknown or rank > self.ml.r:
            raise AdapterLoadError(f"model {model.id!r} needs rank {rank} on {unknown or 'the wrapped modules'}, "
                                   f"but the server's slots hold rank {self.ml.r} on {list(self.ml.target_modules)}: "
                                   "restart `oppu serve` (it sizes its slots from the adapters on disk)")
        slot = self.ml.load_state_dict(key, state, alpha=float(rank), r=rank)
        self._slots[key] = 1
        self.loads += 1
        return slot

    def release(self, model) -> None:
        key = model.slot_key
        if key is not None and key in self._slots:
            self._slots[key] = max(0, self._slots[key] - 1)

    @property
    def held(self) -> int:
        return len(self._slots)
