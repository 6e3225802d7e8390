"""Where a run's personal adapters live while they train and answer: one interface, two engines.

- `MultiLoraBank` (LoRA, the default): every adapter is a slot of one gathered multi-LoRA model
  (`oppu/multilora.py`). The users of a chunk train in shared batches (each row routed to its own user's slot,
  per-user loss, clipping and AdamW) and answer in shared batches; rows leave a batch as soon as they end.
- `PeftBank` (IA3, prompt tuning, or LoRA with `RunConfig.batching="per_user"`): PEFT's own adapters on one
  `AdapterPool`, trained one user after another (`oppu.train`) and answered through `oppu.generate`.
- `batching="auto"` takes, per device, the engine measured faster on a real run (`AUTO_ENGINE`).

Both save standard PEFT adapter folders with the same manifest, so adapters, the store and the dashboard cannot
tell which engine made them. The experiment only talks to this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from oppu.config import GenerationConfig, PeftConfig, TrainConfig

BATCHINGS = ("multi_lora", "per_user")


class AdapterBank(Protocol):
    engine: str
    """Which engine trained the adapters (written into each manifest)."""

    @property
    def base(self) -> Any:
        """What profile generation runs on: the base model, never a user's adapter."""

    def train(self, tokenizer, task, users: Sequence[Any], style, peft_cfg: PeftConfig, train_cfg: TrainConfig, *,
              histories: Mapping[str, Sequence[Any]], retriever, profiles: Mapping[str, str | None],
              adapter_keys: Mapping[str, str], progress: Callable | None,
              should_stop: Callable[[], bool] | None) -> dict[str, Any]:
        """A fresh adapter per user (named by `adapter_keys[user id]`), each trained on that user's data only;
        returns `oppu.train.TrainResult` per user id."""

    def save(self, key: str, folder: str | Path, manifest: dict[str, Any]) -> Path: ...

    def generate(self, tokenizer, prompts: Sequence[str], keys: Sequence[str | None], gen_cfg: GenerationConfig,
                 max_new_tokens: int, max_prompt_tokens: int) -> list[str]:
        """Row i answered with adapter `keys[i]` (None: the base model); a prompt keeps its last
        `max_prompt_tokens` tokens, as a training example keeps the end of its prompt."""

    def delete(self, key: str) -> None: ...


def dtype_name(model) -> str:
    """The dtype the base's weights compute in (`float32`, `bfloat16`, ...): what each manifest records. The
    adapters themselves are float32 whatever it is (PEFT's `autocast_adapter_dtype`, multi-LoRA's fp32 factors)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


class PeftBank:
    """PEFT adapters on one `AdapterPool`, trained user after user: every PEFT kind, the reference path."""

    engine = "per_user"

    def __init__(self, model):
        from oppu.model import AdapterPool

        self.pool = AdapterPool(model)

    @property
    def base(self):
        return self.pool

    def train(self, tokenizer, task, users, style, peft_cfg, train_cfg, **kwargs) -> dict[str, Any]:
        from oppu.train import train_users

        return train_users(self.pool, tokenizer, task, users, style, peft_cfg, train_cfg, **kwargs)

    def save(self, key: str, folder, manifest) -> Path:
        from oppu.model import save_user_adapter

        return save_user_adapter(self.pool, key, folder, {**manifest, "compute_dtype": dtype_name(self.pool.base)})

    def generate(self, tokenizer, prompts, keys, gen_cfg, max_new_tokens, max_prompt_tokens) -> list[str]:
        from oppu.generate import generate

        names = [None if k is None else self.pool.name_of(k) for k in keys]
        return generate(self.pool, tokenizer, prompts, names, gen_cfg, max_new_tokens=max_new_tokens,
                        max_prompt_tokens=max_prompt_tokens)

    def delete(self, key: str) -> None:
        self.pool.delete(key)


class MultiLoraBank:
    """LoRA adapters as slots of one `MultiLora`: a chunk's users train and answer in shared batches."""

    engine = "multi_lora"

    def __init__(self, model, peft_cfg: PeftConfig, capacity: int = 8):
        from oppu.multilora import MultiLora

        self.ml = MultiLora.from_peft_config(model, peft_cfg, capacity=capacity)

    @property
    def base(self):
        return self.ml.model  # with no route set, every wrapped layer is its base layer

    def train(self, tokenizer, task, users, style, peft_cfg, train_cfg, **kwargs) -> dict[str, Any]:
        from oppu.multilora import train_users

        return train_users(self.ml, tokenizer, task, users, style, peft_cfg, train_cfg, **kwargs)

    def save(self, key: str, folder, manifest) -> Path:
        return self.ml.save(key, folder, {**manifest, "compute_dtype": dtype_name(self.ml.model)})

    def generate(self, tokenizer, prompts, keys, gen_cfg, max_new_tokens, max_prompt_tokens) -> list[str]:
        from oppu.multilora import generate_multi, greedy, sampler

        pick = greedy if gen_cfg.greedy else sampler(gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p,
                                                     gen_cfg.seed, self.ml.scaling.device)
        return generate_multi(self.ml, tokenizer, prompts, list(keys), max_new_tokens,
                              batch_size=gen_cfg.batch_size, max_prompt_tokens=max_prompt_tokens, pick=pick)

    def delete(self, key: str) -> None:
        self.ml.remove(key)


AUTO_ENGINE = {"cpu": "multi_lora", "cuda": "multi_lora"}
"""What `batching="auto"` runs LoRA users with, per device: the engine measured faster on a real run there
(`python -m bench.engines`, quoted in docs/PERFORMANCE.md). IA3 and prompt tuning always run per user."""


def resolve_batching(batching: str, peft_cfg: PeftConfig, device: str) -> str:
    """The engine a run's `batching` setting means for its PEFT kind on `device` (`cpu` or `cuda`)."""
    if batching not in ("auto", *BATCHINGS):
        raise ValueError(f"batching {batching!r}: use auto or one of {', '.join(BATCHINGS)}")
    if peft_cfg.kind != "lora":
        return "per_user"
    return AUTO_ENGINE.get(device, "multi_lora") if batching == "auto" else batching


def make_bank(model, peft_cfg: PeftConfig, batching: str = "auto") -> AdapterBank:
    """The engine for a run: gathered multi-LoRA or PEFT's per-user loop, as `resolve_batching` picks."""
    device = next(model.parameters()).device.type
    if resolve_batching(batching, peft_cfg, device) == "multi_lora":
        return MultiLoraBank(model, peft_cfg)
    return PeftBank(model)
