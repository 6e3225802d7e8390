"""The PEFT training loops: per-user PEFT and the loop task adaptation (`oppu.adaptation`) trains with (the
multi-user batched LoRA loop is `oppu.multilora`'s; all build their examples with `oppu.examples`).

Protocol (the paper / official code, minus its defects):
- Loss on the answer tokens only: prompt tokens are labelled `IGNORE_INDEX`; one loss definition
  (`answer_cross_entropy`), one answer-token count and one padding rule (`training_pad_id`) serve this loop and the
  multi-user one.
- Prompts are chat-templated exactly as at generation time (`generate.encode_prompt`), so the adapter learns
  the format it will be asked in.
- A per-user adapter trains on THAT user's history only: its examples are built inside `train_user` from the
  user passed in (`oppu.examples.user_examples`).
- Seeded: adapter initialisation, example order and sampling depend only on `TrainConfig.seed`.

Progress goes through `progress(stage, step, total, loss)`; `should_stop()` is honoured between steps by raising
`StopRequested`, so nothing half-trained is ever saved as complete.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from oppu.attention import is_16bit, training_forward
from oppu.config import PeftConfig, TrainConfig
from oppu.examples import Example, PromptStyle, trained_items, user_examples
from oppu.generate import encode_prompt
from oppu.model import AdapterPool, chat_end_token
from oppu.retrieval import Retriever

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, float | None], None]
ShouldStop = Callable[[], bool]
TOKENS_PER_FORWARD = 256
"""Padded tokens per forward pass in float32 training on a CPU: bounds activation memory (~1.5 MB per token for
SmolLM2-135M in fp32). Measured peak RSS of one 8-example step (1,419 tokens): 2.6 GB at 768, 1.8 GB at 384, 1.4 GB
at 256, with no loss of speed on CPU (a row of 150 tokens still makes matmuls large enough). Packing rows would
not pay either, since `length_chunks` leaves 0-1.5% of a pass's tokens as padding on the demo data
(docs/PERFORMANCE.md, "Padding and packing in training")."""
TOKENS_PER_FORWARD_16BIT = 384
"""The same on a CPU for a 16-bit model, where a forward's fixed cost (streaming every weight through the core,
~145 ms of forward and backward at 16 tokens on the 2-core AMX Xeon) is a larger share. With the lean eager
training attention (`oppu.attention`), 8 users' training ran 1.16x faster at 384 than at 256 and 1.23x at 512
(`python -m bench.training --users 8 --items 8 --epochs 1 --budgets 256,384,512`); but in a default 8-user run
(plain then RAG-style training, LaMP_2M) 512 peaked at 2022 MiB against 1791 MiB at 384 in a one-off run, and at
1885 MiB against 1786-1863 MiB in `python -m bench.engines --items 8 --epochs 1 --tokens-per-forward-16bit 512`
(default 384), for 4% of its wall time. 384 keeps a run clear of 2 GB."""
GPU_TOKENS_PER_FORWARD_MAX = 65536
IGNORE_INDEX = -100
"""Label of a token that carries no loss (prompt and padding), as in Hugging Face."""


def tokens_per_forward_for(model) -> int:
    """Padded tokens per training forward pass on the model's device (the per-user and the multi-user loop alike).

    CPU: `TOKENS_PER_FORWARD_16BIT` for a bf16/fp16 model, `TOKENS_PER_FORWARD` otherwise (measured). GPU: as many
    tokens as a quarter of the free memory holds, at an estimate of 20 activations of hidden size per layer and
    token (SmolLM2-135M in fp32: ~1.4 MB a token). A small model's step on a GPU is bound by kernel launches, so one wide pass per step beats
    a dozen narrow ones (measured on an H200: docs/PERFORMANCE.md).
    """
    import torch

    param = next(model.parameters())
    if param.device.type != "cuda":
        return TOKENS_PER_FORWARD_16BIT if is_16bit(model) else TOKENS_PER_FORWARD
    free, _ = torch.cuda.mem_get_info(param.device)
    cfg = model.config
    per_token = 20 * cfg.hidden_size * cfg.num_hidden_layers * param.element_size()
    return int(max(TOKENS_PER_FORWARD, min(GPU_TOKENS_PER_FORWARD_MAX, 0.25 * free / per_token)))


class StopRequested(Exception):
    """should_stop() returned True between two training steps."""


@dataclass
class TrainResult:
    user_id: str
    adapter: str
    curve: list[tuple[int, float]]
    examples: int
    item_ids: list[str]
    data_hash: str
    stopped: bool = False

    @property
    def final_loss(self) -> float | None:
        return self.curve[-1][1] if self.curve else None


# -- encoding and the loop -----------------------------------------------------------------------------------
def answer_end_ids(tokenizer) -> list[int]:
    """What closes an answer in training: the chat template's end-of-turn, else the EOS token."""
    end = chat_end_token(tokenizer)
    if end is not None:
        return [tokenizer.convert_tokens_to_ids(end)]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def encode_example(tokenizer, example: Example, max_length: int, end_ids: Sequence[int]) -> tuple[list, list]:
    """(input_ids, labels) with the prompt masked; the answer keeps at most half the length budget."""
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"][: max_length // 2] + list(end_ids)
    prompt = encode_prompt(tokenizer, example.prompt, max_length - len(target))
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def right_pad(batch: Sequence[tuple[list, list]], pad_id: int, device):
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def length_chunks(lengths: Sequence[int], tokens_per_forward: int) -> list[list[int]]:
    """Indices of one batch grouped by similar length, each group's rows x padded width within the budget.

    A batch is cut into such chunks with gradient accumulation: the loss is the same up to float rounding, but
    activation memory is bounded and short rows stop being padded to the longest row of the batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= tokens_per_forward:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor at `step` (0-based): linear warmup over `warmup` steps, then linear decay to zero at
    `total` (the per-user and the multi-user loop share it, so their schedules cannot drift apart)."""
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    return max(0.0, (total - step) / max(total - warmup, 1))


def make_batches(n_examples: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """One user's batches of example indices in training order: one `random.Random(seed)` shuffling the examples
    again every epoch, the last batch of an epoch short (the per-user and the multi-user loop visit these)."""
    rng = random.Random(seed)
    batches = []
    for _ in range(epochs):
        order = list(range(n_examples))
        rng.shuffle(order)
        batches += [order[i:i + batch_size] for i in range(0, n_examples, batch_size)]
    return batches


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def training_pad_id(tokenizer) -> int:
    """The id that pads training rows (both loops): the tokenizer's pad token, else its EOS. Rows are padded on
    the right, after every real token, with label `IGNORE_INDEX`, so causal attention never reads it."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def answer_tokens(labels: Sequence[int]) -> int:
    """How many of a row's tokens carry loss: labels other than `IGNORE_INDEX` after the first token (the first
    is never predicted). A batch's loss is the sum over these divided by their count."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


def answer_cross_entropy(model, hidden, labels, reduction: str = "sum"):
    """(cross-entropy, picked): the loss at a batch's answer positions from the decoder's hidden states, shifted
    as in causal LM training, and the [rows, width - 1] mask of those positions (labels != `IGNORE_INDEX`).

    The one loss definition of both training loops. The vocabulary projection runs on the answer positions only:
    over every position of a batch the float logits (SmolLM2: 49k vocabulary) were most of a training step's
    memory (~5 GB for 8 x 384 tokens) and time. `reduction` is `cross_entropy`'s ("none": one loss per picked
    position, in row-major order).
    """
    import torch

    targets = labels[:, 1:]
    picked = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][picked])
    # At least fp32 (a 16-bit base's logits are upcast); a float64 model keeps float64, which the exactness
    # tests use to compare training paths at a rounding far below any real difference.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits, targets[picked], reduction=reduction), picked


def answer_loss_sum(model, ids, mask, labels):
    """Sum of the cross-entropies at answer positions (`answer_cross_entropy` over the decoder's forward).

    Prompt tuning prepends virtual tokens inside PEFT's own forward, so it keeps the full forward.
    """
    if _is_prompt_learning(model):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        return out.loss * (labels[:, 1:] != IGNORE_INDEX).sum()
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return answer_cross_entropy(model, hidden, labels)[0]


def _accumulate(model, batch: Sequence[tuple[list, list]], pad_id: int, device, tokens_per_forward: int) -> float:
    """Backward of one batch's mean answer-token loss, in length-sorted chunks; returns that loss."""
    n_answer = sum(answer_tokens(labels) for _, labels in batch)
    if n_answer == 0:
        raise ValueError("a training batch has no answer tokens: every example needs a non-empty target")
    total = 0.0
    for chunk in length_chunks([len(ids) for ids, _ in batch], tokens_per_forward):
        ids, mask, labels = right_pad([batch[i] for i in chunk], pad_id, device)
        with training_forward(model):
            loss = answer_loss_sum(model, ids, mask, labels) / n_answer
        loss.backward()
        total += float(loss.detach())
    return total


def train_loop(model, params: list, encoded: Sequence[tuple[list, list]], cfg: TrainConfig, pad_id: int,
               stage: str, progress: Progress | None = None, should_stop: ShouldStop | None = None,
               tokens_per_forward: int | None = None, checkpoint: Any = None) -> list[tuple[int, float]]:
    """AdamW with linear warmup/decay over `cfg.epochs` shuffled passes; returns the (step, loss) curve.

    Each step's loss is the mean over the batch's answer tokens (as Hugging Face's causal-LM loss); the batch
    runs in chunks of at most `tokens_per_forward` padded tokens (default `tokens_per_forward_for(model)`).
    `checkpoint` (an `oppu.checkpoint.Checkpoint`): the loop continues from the state saved there, if any
    (reported as `progress(stage, step reached, total, None)`), and saves its state as it goes.
    """
    import torch

    if not encoded:
        return []
    tokens_per_forward = tokens_per_forward or tokens_per_forward_for(model)
    device = next(model.parameters()).device
    batches = make_batches(len(encoded), cfg.batch_size, cfg.epochs, cfg.seed)
    total = len(batches)
    warmup = int(total * cfg.warmup_ratio)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total, warmup))
    curve: list[tuple[int, float]] = []
    identity = {"stage": stage, "total": total, "examples": len(encoded), "params": [list(p.shape) for p in params]}
    start = 0
    state = checkpoint.load(identity) if checkpoint is not None else None
    if state is not None:
        from oppu.checkpoint import set_rng_state

        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        curve = [(int(s), float(v)) for s, v in state["curve"]]
        start = int(state["step"])
        log.info("%s: continuing from the checkpoint at step %d of %d", stage, start, total)
        if progress is not None:
            progress(stage, start, total, None)
    was_training = model.training
    model.train()
    try:
        for step, indices in enumerate(batches[start:], start=start + 1):
            if should_stop is not None and should_stop():
                raise StopRequested(f"stopped at step {step - 1} of {total} ({stage})")
            loss = _accumulate(model, [encoded[i] for i in indices], pad_id, device, tokens_per_forward)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append((step, loss))
            if checkpoint is not None and checkpoint.due(step, total):
                from oppu.checkpoint import rng_state

                checkpoint.save(identity, {
                    "step": step, "curve": [list(c) for c in curve], "rng": rng_state(),
                    "params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()})
            if progress is not None:
                progress(stage, step, total, loss)
    finally:
        model.train(was_training)
        for p in params:
            p.grad = None
    return curve


# -- per-user adapters ---------------------------------------------------------------------------------------
def train_user(pool: AdapterPool, tokenizer, task, user, style: PromptStyle, peft_cfg: PeftConfig,
               train_cfg: TrainConfig, *, history: Sequence[Any] | None = None, retriever: Retriever | None = None,
               profile: str | None = None, adapter_key: str | None = None, progress: Progress | None = None,
               should_stop: ShouldStop | None = None, checkpoint: Any = None) -> TrainResult:
    """Train a fresh adapter in `pool` for one user, on that user's own history only.

    `history` narrows the user's items (behaviour-shift cutoff); `adapter_key` names the adapter in the pool
    (default: the user id; the experiment uses one adapter per user and prompt style).
    """
    import torch

    items = list(user.history if history is None else history)
    examples = user_examples(task, items, style, retriever, profile, train_cfg.max_examples, train_cfg.seed)
    key = adapter_key or str(user.id)
    torch.manual_seed(train_cfg.seed)  # adapter initialisation is part of the seeded run
    name = pool.add(key, peft_cfg)
    params = pool.trainable_parameters(key)
    end_ids = answer_end_ids(tokenizer)
    encoded = [encode_example(tokenizer, ex, train_cfg.max_length, end_ids) for ex in examples]
    stage = f"user:{user.id}:{style.key}"
    if progress is not None:
        progress(stage, 0, len(make_batches(len(encoded), train_cfg.batch_size, train_cfg.epochs, train_cfg.seed)),
                 None)
    curve = train_loop(pool.model, params, encoded, train_cfg, training_pad_id(tokenizer), stage, progress,
                       should_stop, checkpoint=checkpoint)
    for p in params:
        p.requires_grad_(False)
    item_ids, data_hash = trained_items(task, items, examples)
    return TrainResult(user_id=str(user.id), adapter=name, curve=curve, examples=len(examples), item_ids=item_ids,
                       data_hash=data_hash)


def train_users(pool: AdapterPool, tokenizer, task, users: Sequence[Any], style: PromptStyle,
                peft_cfg: PeftConfig, train_cfg: TrainConfig, *, histories: dict[str, Sequence[Any]] | None = None,
                retriever: Retriever | None = None, profiles: dict[str, str | None] | None = None,
                adapter_keys: dict[str, str] | None = None, progress: Progress | None = None,
                should_stop: ShouldStop | None = None, checkpoint: Any = None) -> dict[str, TrainResult]:
    """Adapters for several users, each on its own history (one adapter per user), one user after another.

    The PEFT reference path (`oppu.banks.PeftBank`: IA3, prompt tuning, `batching="per_user"`). LoRA runs use
    `oppu.multilora.train_users`, the same signature with every user's rows in shared batches.
    """
    results = {}
    for user in users:
        uid = str(user.id)
        results[uid] = train_user(
            pool, tokenizer, task, user, style, peft_cfg, train_cfg,
            history=(histories or {}).get(uid), retriever=retriever, profile=(profiles or {}).get(uid),
            adapter_key=(adapter_keys or {}).get(uid), progress=progress, should_stop=should_stop,
            checkpoint=None if checkpoint is None else checkpoint.child(uid))
    return results
