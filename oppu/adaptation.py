"""Task adaptation: one LoRA per prompt style trained on the OTHER users' gold-labelled queries, and the
task-adapted bases those LoRAs make, switched in place on one model.

Protocol (`task_LoRA.py`, minus its defects):
- The data is other users' queries with their gold outputs, never their history items as targets
  (`oppu.examples.adaptation_examples`); a retrieval style retrieves from that user's own history, a profile
  style adds that user's profile.
- One task LoRA per prompt style: the official code trains separate task LoRAs for k=0, k=1 and k=1 + profile,
  so each method's personal adapters start from a base adapted to prompts of their own shape.
- `adapt_task` trains (or finds in the cache) ONE style's LoRA and returns its folder; the caller's model is left
  exactly as it was (the LoRA is trained on a PEFT wrapper that is unloaded afterwards, never merged).
- `TaskBases` holds the original weights of the adapted modules and each style's LoRA factors, and sets a
  style's base in place (`original + B @ A * scaling`, always computed from the saved originals, so switching
  back and forth is exact). It finds the base `nn.Linear` under PEFT's and `oppu.multilora`'s wrappers, so it
  keeps working after a per-user engine has wrapped the model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from oppu.config import PeftConfig, TrainConfig
from oppu.examples import PromptStyle, adaptation_examples
from oppu.retrieval import Retriever
from oppu.train import (
    Progress,
    ShouldStop,
    answer_end_ids,
    encode_example,
    make_batches,
    train_loop,
    training_pad_id,
)

TASK_ADAPTER_FORMAT = 2
"""Bump when example construction changes, so cached task adapters are retrained (2: gold queries only, one
style per adapter, official retrieval queries)."""

_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class AdaptResult:
    """One style's task LoRA: where it lives, whether it came from the cache, its training curve."""

    folder: Path
    cached: bool
    style: PromptStyle
    curve: list[tuple[int, float]] = field(default_factory=list)
    examples: int = 0
    """Training examples (0 when cached: see the folder's manifest.json)."""


def adaptation_key(**parts: Any) -> str:
    """Cache key of a task LoRA: model, task, data fingerprint, PEFT and training config, style, retriever."""
    import hashlib

    payload = json.dumps({**parts, "format": TASK_ADAPTER_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def adapt_task(model, tokenizer, task, users: Sequence[Any], style: PromptStyle, peft_cfg: PeftConfig,
               train_cfg: TrainConfig, cache_dir: str | os.PathLike, *, model_name: str, data_fingerprint: str,
               retriever: Retriever | None = None, retriever_name: str = "", progress: Progress | None = None,
               should_stop: ShouldStop | None = None) -> AdaptResult:
    """Train (or reuse from the cache) the task LoRA of ONE prompt style on other users' gold queries.

    Cached under `cache_dir/task_adapters/<task>/<key>/` (a standard PEFT folder plus manifest.json), keyed by
    model, task, data fingerprint, PEFT and training config, style and retriever. `model` must be the plain
    base (not switched to another style's base) and is returned to exactly that state, also when stopped.
    Progress stage: `adapt:<task>:<style key>`, announced with step 0 and the total before the first step
    (a cached LoRA is announced as `(stage, 0, 0, None)`: nothing to train). Training checkpoints to
    `<key>-checkpoint/` beside the cache folder (`oppu.checkpoint`), so a stopped or killed adaptation continues
    from its last checkpoint; the checkpoint is removed once the LoRA is saved.
    """
    import peft
    import torch

    from oppu.checkpoint import Checkpoint
    from oppu.manifest import stamp_created, write_manifest
    from oppu.model import to_peft_config
    from oppu.paths import atomic_folder, file_lock, safe_component

    key = adaptation_key(model=model_name, task=task.id, data=data_fingerprint, peft=asdict(peft_cfg),
                         train=asdict(train_cfg), style=asdict(style), retriever=retriever_name)
    folder = Path(cache_dir) / "task_adapters" / safe_component(task.id) / key
    stage = f"adapt:{task.id}:{style.key}"
    with file_lock(folder.with_name(folder.name + ".lock")):
        if (folder / "adapter_model.safetensors").is_file():
            if progress is not None:
                progress(stage, 0, 0, None)
            return AdaptResult(folder, cached=True, style=style)
        examples = adaptation_examples(task, users, style, retriever, train_cfg.seed, train_cfg.max_examples)
        if not examples:
            raise ValueError(f"task adaptation for {task.id} has no examples: the other users have no "
                             "gold-labelled queries; pass task_adaptation=False to skip it")
        end_ids = answer_end_ids(tokenizer)
        encoded = [encode_example(tokenizer, ex, train_cfg.max_length, end_ids) for ex in examples]
        if progress is not None:
            total = len(make_batches(len(encoded), train_cfg.batch_size, train_cfg.epochs, train_cfg.seed))
            progress(stage, 0, total, None)
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        was_training = model.training
        torch.manual_seed(train_cfg.seed)
        wrapped = peft.get_peft_model(model, to_peft_config(peft_cfg))
        try:
            params = [p for p in wrapped.parameters() if p.requires_grad]
            checkpoint = Checkpoint(folder.with_name(f"{folder.name}-checkpoint"))
            curve = train_loop(wrapped, params, encoded, train_cfg, training_pad_id(tokenizer), stage, progress,
                               should_stop, checkpoint=checkpoint)
            # A partial folder from a crashed run is replaced as a whole (we hold the lock).
            with atomic_folder(folder) as tmp:
                wrapped.save_pretrained(str(tmp))
                write_manifest(tmp, stamp_created(
                    {"task": task.id, "model": model_name, "data_fingerprint": data_fingerprint, "key": key,
                     "style": asdict(style), "style_key": style.key, "retriever": retriever_name,
                     "examples": len(examples), "final_loss": curve[-1][1] if curve else None,
                     "peft": asdict(peft_cfg), "train": asdict(train_cfg), "format": TASK_ADAPTER_FORMAT}))
            checkpoint.clear()
        finally:
            # Unload, never merge: the caller's weights stay bit for bit what they were.
            wrapped.unload()
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if attr in vars(model):
                    delattr(model, attr)
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad.get(name, p.requires_grad))
            model.train(was_training)
        return AdaptResult(folder, cached=False, style=style, curve=curve, examples=len(examples))


# -- task-adapted bases ------------------------------------------------------------------------------------------
def base_linear(module):
    """The plain `nn.Linear` under a LoRA wrapper: `oppu.multilora`'s `.base`, PEFT's `.base_layer`."""
    from torch import nn

    seen = 0
    while not isinstance(module, nn.Linear):
        inner = getattr(module, "base_layer", None) or getattr(module, "base", None)
        if inner is None or seen > 4:
            raise TypeError(f"no nn.Linear found under {type(module).__name__}")
        module, seen = inner, seen + 1
    return module


def _load_lora(folder: str | os.PathLike) -> tuple[dict[str, tuple[Any, Any]], float]:
    """{module name: (A [r, in], B [out, r])} and the scaling of a plain PEFT LoRA folder."""
    from oppu.multilora.model import read_lora_folder

    cfg, state = read_lora_folder(folder, "merges into a task-adapted base")
    r = int(cfg["r"])
    scaling = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected key {key!r} in task adapter {folder}: only LoRA A/B weights merge")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    incomplete = [m for m, ab in pairs.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"task adapter {folder} lacks lora_A or lora_B for {incomplete[:3]}")
    return {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}, scaling


class TaskBases:
    """Task-adapted bases of one model, one per key (a `PromptStyle` or its `.key`), set in place by `use`.

    Built once from the UNMERGED base model: it saves an exact copy of every adapted module's original weight
    and each key's LoRA factors. `use(key)` assigns `original + (B @ A) * scaling` (PEFT's merge arithmetic) to
    those weights; `use(None)` assigns the originals back. Nothing is ever subtracted, so a switch is exactly
    reproducible. The model may meanwhile be wrapped by PEFT or `oppu.multilora`: the weights are found by
    module name under the wrappers.
    """

    def __init__(self, model, folders: Mapping[Hashable, str | os.PathLike]):
        import torch

        self.model = model
        self.current: Hashable | None = None
        self._factors: dict[Hashable, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self._originals: dict[str, torch.Tensor] = {}
        for key, folder in folders.items():
            pairs, scaling = _load_lora(folder)
            factors = {}
            for name, (a, b) in pairs.items():
                weight = self._weight(model, name)
                if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
                    raise ValueError(f"task adapter {folder}, module {name}: factors {tuple(b.shape)} x "
                                     f"{tuple(a.shape)} do not fit its weight {tuple(weight.shape)}")
                if name not in self._originals:
                    self._originals[name] = weight.detach().clone()
                # PEFT keeps LoRA factors in fp32 over a 16-bit base; its merge then adds an fp32 delta.
                dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
                factors[name] = (a.to(weight.device, dtype), b.to(weight.device, dtype), scaling)
            self._factors[key] = factors

    @property
    def keys(self) -> tuple[Hashable, ...]:
        return tuple(self._factors)

    def _resolve(self, key: Hashable | None) -> Hashable | None:
        if key is None or key in self._factors:
            return key
        by_name = getattr(key, "key", None)
        if by_name in self._factors:
            return by_name
        raise KeyError(f"no task-adapted base for {key!r}: built for {list(self._factors)}")

    @staticmethod
    def _weight(model, name: str):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            get_base = getattr(model, "get_base_model", None)  # a PeftModel around the model
            if get_base is None:
                raise
            module = get_base().get_submodule(name)
        return base_linear(module).weight

    def use(self, key: Hashable | None, model=None) -> None:
        """Set `model` (default: the model these bases were built from) to the base of `key`; None restores the
        original weights. `key` is one of the keys the bases were built with, or a PromptStyle whose `.key` is."""
        import torch

        key = self._resolve(key)
        model = self.model if model is None else model
        factors = self._factors.get(key, {}) if key is not None else {}
        with torch.no_grad():
            for name, original in self._originals.items():
                weight = self._weight(model, name)
                if name in factors:
                    a, b, scaling = factors[name]
                    weight.copy_((original.to(a.dtype) + (b @ a) * scaling).to(original.dtype))
                else:
                    weight.copy_(original)
        self.current = key
