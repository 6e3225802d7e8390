"""Batched, reproducible generation, with rows of many users (each its own adapter) in one batch.

- Prompts are user messages; they are wrapped in the tokenizer's chat template when it has one (as in training).
- Left padding + KV cache; greedy by default, seeded sampling when asked.
- Only the NEW tokens are decoded (a slice of the output ids), cut at the first end-of-sequence token of the row;
  the official code stripped the prompt with `str.replace`, which breaks whenever decoding is not a round trip.
- Mixed-adapter batches: LoRA rows go through PEFT's `generate(..., adapter_names=[...])` (`__base__` = none).
  Other PEFT kinds (IA3, prompt tuning) cannot mix adapters in one forward pass, so their rows are grouped by
  adapter and each group runs with that adapter active.

Returns raw strings; callers normalise them with `task.normalize` and keep the raw text too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from oppu.config import GenerationConfig
from oppu.model import BASE_ADAPTER, KIND_OF_PEFT_TYPE, AdapterPool, eos_token_ids

log = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_TOKENS = 1536
"""For callers that pass no cutoff; a run answers with `prompt_budget` of its training cutoff instead."""


def prompt_budget(cutoff: int, max_new_tokens: int) -> int:
    """Prompt tokens an answer may keep under a run's token cutoff: the cutoff less the answer budget, as in
    training, where a prompt keeps `cutoff - len(target)` tokens (`oppu.train.encode_example`) and a target at
    most half the cutoff."""
    return max(cutoff - max_new_tokens, cutoff // 2)


def chat_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees for one user message: chat-templated when the tokenizer has a template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Token ids of a chat-wrapped prompt, keeping the LAST `max_tokens` ids when it is too long.

    Prompts end with the question and the answer cue, which must survive; what is cut first is the start (the
    oldest retrieved items / profile), and the chat header when it comes to that.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=not templated)["input_ids"]
    if len(ids) > max_tokens:
        log.warning("prompt of %d tokens cut to its last %d", len(ids), max_tokens)
        ids = ids[-max_tokens:]
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _cut_at_eos(ids: Sequence[int], eos: set[int]) -> list[int]:
    out = []
    for token in ids:
        if token in eos:
            break
        out.append(token)
    return out


def _device_of(model):
    return next(model.parameters()).device


def _generate_batch(model, tokenizer, rows: list[list[int]], adapter_names: list[str] | None,
                    gen_cfg: GenerationConfig, max_new_tokens: int, eos: list[int]) -> list[str]:
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    ids, mask = left_pad(rows, pad_id, _device_of(model))
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": max_new_tokens,
                              "eos_token_id": eos, "pad_token_id": pad_id, "use_cache": True}
    if gen_cfg.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        torch.manual_seed(gen_cfg.seed)
        kwargs.update(do_sample=True, temperature=gen_cfg.temperature, top_k=gen_cfg.top_k, top_p=gen_cfg.top_p)
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    with torch.no_grad():
        out = model.generate(**kwargs)
    new = out[:, ids.shape[1]:].tolist()  # only what was generated: slice, never str.replace
    eos_set = set(eos)
    return [tokenizer.decode(_cut_at_eos(row, eos_set), skip_special_tokens=True) for row in new]


def _peft_kind(peft_model) -> str:
    """`lora`, `ia3` or `prompt` for a bare PeftModel (all its adapters share one kind)."""
    config = next(iter(peft_model.peft_config.values()))
    peft_type = getattr(config.peft_type, "value", str(config.peft_type))
    return KIND_OF_PEFT_TYPE.get(peft_type, peft_type.lower())


def _batches(rows: list[int], lengths: list[int], size: int, same_length: bool) -> list[list[int]]:
    """Consecutive batches of at most `size` rows (already sorted by length).

    Prompt tuning puts its virtual tokens in front of the left padding and PEFT then ignores position ids, so a
    padded row would see shifted positions: its batches hold rows of one length only (no padding at all).
    """
    batches: list[list[int]] = []
    batch_length = None
    for row, length in zip(rows, lengths, strict=True):
        if not batches or len(batches[-1]) >= size or (same_length and length != batch_length):
            batches.append([])
            batch_length = length
        batches[-1].append(row)
    return batches


def _groups(adapters: Sequence[str], mixable: bool) -> list[tuple[str | None, list[int]]]:
    """Row groups that may share one forward pass: everything when adapters can mix, else one per adapter."""
    if mixable:
        return [(None, list(range(len(adapters))))]
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(adapters):
        by_name.setdefault(name, []).append(i)
    return list(by_name.items())


def generate(model, tokenizer, prompts: Sequence[str], adapters: Sequence[str | None] | None = None,
             gen_cfg: GenerationConfig | None = None, max_new_tokens: int | None = None,
             max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS) -> list[str]:
    """Answer every prompt; row i runs with adapter `adapters[i]` (a PEFT adapter name, None = base model).

    `model` is an `AdapterPool` (adapters by name), a `PeftModel`, or a plain model (then adapters must all be
    None). Rows are sorted by length into batches of `gen_cfg.batch_size` and returned in input order.
    """
    gen_cfg = gen_cfg or GenerationConfig()
    n = len(prompts)
    if n == 0:
        return []
    names = [a or BASE_ADAPTER for a in (adapters if adapters is not None else [None] * n)]
    if len(names) != n:
        raise ValueError(f"{n} prompts but {len(names)} adapter names: pass one adapter name (or None) per prompt")
    pool_kind = model.kind if isinstance(model, AdapterPool) else None
    runner = model.active_model if isinstance(model, AdapterPool) else model
    from peft import PeftModel

    has_peft = isinstance(runner, PeftModel)
    if not has_peft and any(name != BASE_ADAPTER for name in names):
        raise ValueError("adapters were named but the model has none: pass the AdapterPool holding them")
    if pool_kind is None and has_peft:
        pool_kind = _peft_kind(runner)
    budget = max_new_tokens or gen_cfg.max_new_tokens or 32
    eos = eos_token_ids(tokenizer, runner)
    encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    outputs: list[str | None] = [None] * n
    was_training = runner.training
    runner.eval()
    try:
        for group_adapter, rows in _groups(names, mixable=pool_kind == "lora" or not has_peft):
            rows = sorted(rows, key=lambda i: len(encoded[i]))
            for batch in _batches(rows, [len(encoded[i]) for i in rows], gen_cfg.batch_size,
                                  same_length=pool_kind == "prompt"):
                texts = _run_group(runner, tokenizer, [encoded[i] for i in batch], [names[i] for i in batch],
                                   group_adapter, has_peft, gen_cfg, budget, eos)
                for i, text in zip(batch, texts, strict=True):
                    outputs[i] = text
    finally:
        runner.train(was_training)
    return [o if o is not None else "" for o in outputs]


def _run_group(runner, tokenizer, rows, row_names, group_adapter, has_peft, gen_cfg, budget, eos) -> list[str]:
    """One batch: mixed adapter names (LoRA), one named adapter, or the bare base."""
    if not has_peft:
        return _generate_batch(runner, tokenizer, rows, None, gen_cfg, budget, eos)
    if group_adapter is None:  # mixable kind: route each row to its adapter inside one forward pass
        if all(name == BASE_ADAPTER for name in row_names):
            with runner.disable_adapter():
                return _generate_batch(runner, tokenizer, rows, None, gen_cfg, budget, eos)
        return _generate_batch(runner, tokenizer, rows, list(row_names), gen_cfg, budget, eos)
    if group_adapter == BASE_ADAPTER:
        with runner.disable_adapter():
            return _generate_batch(runner, tokenizer, rows, None, gen_cfg, budget, eos)
    previous = runner.active_adapter
    runner.set_adapter(group_adapter)
    try:
        return _generate_batch(runner, tokenizer, rows, None, gen_cfg, budget, eos)
    finally:
        runner.set_adapter(previous)
