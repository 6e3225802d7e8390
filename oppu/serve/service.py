"""The serving core without HTTP: one base model wrapped as a `MultiLora`, the served models' registry, the
adapter cache and the continuous-batching scheduler, plus prompt encoding the way `oppu.generate` encodes it.

`Service.complete` answers a list of prompts synchronously (the playground and the tests use it); the HTTP app
(`oppu.serve.app`) and the Ray deployment submit `GenRequest`s and stream their tokens.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oppu.errors import OppuError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")


class PromptTooLong(OppuError, ValueError):
    """A prompt longer than the server accepts."""


@dataclass(frozen=True)
class ServeConfig:
    """How a server is sized; the defaults suit the embedded model on a CPU."""

    artifacts: str = "runs/artifacts"
    """Where the runs' adapters (`adapters/`) and task adapters (`task_adapters/`) are."""
    model: str | None = None
    """Base model (embedded default, hub id or folder); None: the default `ModelConfig().name`."""
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 32
    """Rows decoding together at most; more requests wait in the queue."""
    max_adapters: int = 32
    """Served models held in memory at once (LRU); more active users than this wait for a free slot."""
    max_prompt_tokens: int = 1536
    """Longer prompts are refused with a 400, never cut silently."""
    max_new_tokens: int = 512
    """Largest `max_tokens` a request may ask for."""
    default_new_tokens: int = 64
    """Budget of a request that gives none on the base model (a task's models default to the task's budget)."""
    cache_dir: str = os.environ.get("OPPU_MODEL_CACHE", ".cache/models")

    def __post_init__(self) -> None:
        from oppu.config import ConfigError

        for name in ("max_batch", "max_adapters", "max_prompt_tokens", "max_new_tokens", "default_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")


def _adapter_shape(folder: Path | None) -> tuple[int, set[str]]:
    if folder is None:
        return 0, set()
    try:
        cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return 0, set()
    targets = cfg.get("target_modules") or []
    return int(cfg.get("r", 0)), set(targets if isinstance(targets, list) else [targets])


def slot_shape(models) -> tuple[int, tuple[str, ...]]:
    """Rank and target modules every served model fits in: task rank + user rank, all modules any adapter
    targets (at least rank 16 on q, k, v: the default task LoRA plus the default personal LoRA)."""
    rank, targets = 16, set(DEFAULT_TARGETS)
    for m in models:
        (r_task, t_task), (r_user, t_user) = _adapter_shape(m.task_folder), _adapter_shape(m.adapter_folder)
        rank, targets = max(rank, r_task + r_user), targets | t_task | t_user
    return rank, tuple(sorted(targets))


class Service:
    """A loaded base model serving every adapter of an artifacts folder through one scheduler."""

    def __init__(self, cfg: ServeConfig, model=None, tokenizer=None):
        from oppu.config import ModelConfig
        from oppu.model import eos_token_ids, load_model, model_key
        from oppu.multilora import MultiLora
        from oppu.serve.cache import AdapterCache
        from oppu.serve.registry import Registry
        from oppu.serve.scheduler import Scheduler

        self.cfg = cfg
        model_cfg = ModelConfig(name=cfg.model or ModelConfig().name, device=cfg.device, dtype=cfg.dtype)
        if model is None:
            model, tokenizer = load_model(model_cfg, cfg.cache_dir)
        self.model_name = model_cfg.name
        self.registry = Registry(cfg.artifacts, model_key(model_cfg))
        self.tokenizer = tokenizer
        self.eos = eos_token_ids(tokenizer, model)
        rank, targets = slot_shape(self.registry.models())
        self.ml = MultiLora(model, capacity=cfg.max_adapters, r=rank, alpha=float(rank), target_modules=targets)
        self.cache = AdapterCache(self.ml, cfg.max_adapters)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.scheduler = Scheduler(self.ml, self.cache, self.eos, pad, max_batch=cfg.max_batch)
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share between threads

    # -- prompts --------------------------------------------------------------------------------------------
    def chat_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """A chat as the model sees it: the chat template with the assistant cue, as `oppu.generate` wraps a
        prompt (a single user message encodes exactly as a run's prompt does)."""
        tok = self.tokenizer
        with self._tokenizer_lock:
            if getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tok("\n".join(str(m["content"]) for m in messages))["input_ids"]
        return self._checked(ids)

    def text_ids(self, prompt: str) -> list[int]:
        """A raw completion prompt (no chat template)."""
        with self._tokenizer_lock:
            ids = self.tokenizer(prompt)["input_ids"]
        return self._checked(ids)

    def _checked(self, ids: list[int]) -> list[int]:
        if not ids:
            raise PromptTooLong("the prompt is empty: send at least one token of text")
        if len(ids) > self.cfg.max_prompt_tokens:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens but this server accepts at most "
                                f"{self.cfg.max_prompt_tokens} (`oppu serve --max-prompt-tokens`)")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def default_budget(self, model) -> int:
        from oppu.tasks import TASKS

        task = TASKS.get(model.task) if model.task else None
        return min(task.max_new_tokens if task is not None else self.cfg.default_new_tokens, self.cfg.max_new_tokens)

    # -- generation -----------------------------------------------------------------------------------------
    def submit(self, model, ids: list[int], max_new_tokens: int, emit, *, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None):
        from oppu.serve.scheduler import GenRequest

        req = GenRequest(ids, model, max_new_tokens, emit, temperature=temperature, top_p=top_p, seed=seed)
        self.scheduler.submit(req)
        return req

    def complete(self, model_name: str, prompts: Sequence[str], max_new_tokens: int | None = None,
                 timeout: float = 600.0) -> list[str]:
        """Answers to user-message prompts on one served model, greedy, all submitted at once (they batch)."""
        model = self.registry.resolve(model_name)
        rows = [self.chat_ids([{"role": "user", "content": p}]) for p in prompts]
        new = self.complete_ids(model, rows, max_new_tokens or self.default_budget(model), timeout)
        return [self.decode(t) for t in new]

    def complete_ids(self, model, rows: Sequence[list[int]], max_new_tokens: int,
                     timeout: float = 600.0) -> list[list[int]]:
        """New token ids (end token excluded) for each prompt's ids on a `ServedModel`, greedy; all rows are
        submitted at once."""
        done = [threading.Event() for _ in rows]
        tokens: list[list[int]] = [[] for _ in rows]
        errors: list[BaseException | None] = [None] * len(rows)

        def sink(i):
            def emit(event):
                kind, value = event
                if kind == "token":
                    tokens[i].append(value)
                    return
                if kind == "error":
                    errors[i] = value
                done[i].set()
            return emit

        for i, ids in enumerate(rows):
            self.submit(model, list(ids), max_new_tokens, sink(i))
        for i, event in enumerate(done):
            if not event.wait(timeout):
                raise TimeoutError(f"no answer within {timeout:.0f} s")
            if errors[i] is not None:
                raise errors[i]
        return tokens

    def close(self) -> None:
        self.scheduler.close()
