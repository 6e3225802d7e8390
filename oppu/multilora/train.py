"""The multi-user batched LoRA trainer: rows of many users in one forward/backward on a `MultiLora`.

Each user's loss is the mean over that user's answer tokens, the total is the sum over users, so a slot only ever
receives gradient from its own user's rows; clipping and AdamW run per slot with per-user step counts, so every
user's adapter ends up as if it had been trained alone on the same batches. The loss definition, batching,
schedule and padding are `oppu.train`'s, shared with the PEFT loop.

`OPPU_COMPILE=1` runs the training forwards' decoder layers compiled (`compiled_layers`); off by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from oppu.attention import training_forward
from oppu.multilora.model import MultiLora, MultiLoraError
from oppu.train import (
    answer_cross_entropy,
    answer_tokens,
    length_chunks,
    linear_schedule,
    make_batches,
    right_pad,
    tokens_per_forward_for,
)


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


COMPILE_ENV = "OPPU_COMPILE"
"""`1`: training forwards run every decoder layer through `torch.compile` (Inductor). Off by default: on the 2-core
AMX CPU training ran 1.13-1.30x faster (on a 2-core Zen 4 EPYC 1.09x), but compiling took ~2 minutes with an empty
Inductor cache (9-10 s once its on-disk cache holds the graphs), more than a default run's training saves;
generation gains nothing and keeps the eager layers (`python -m bench.compile`, docs/PERFORMANCE.md)."""


@contextlib.contextmanager
def compiled_layers(model) -> Iterator[None]:
    """Within the block, with `OPPU_COMPILE=1`, every decoder layer of `model` runs compiled; the eager layers are
    back after it. Regional compilation: the layers share one graph (per shape class and mode), not one each."""
    if os.environ.get(COMPILE_ENV, "0") in ("", "0"):
        yield
        return
    layers = model.get_decoder().layers
    eager = list(layers)
    try:
        for i, layer in enumerate(eager):
            layers[i] = torch.compile(layer)  # a thin wrapper: the compiled graphs are cached by Dynamo, not here
        # Each MultiLoraLinear's `offset` (its columns in the dropout keep-mask) is an int attribute: unless it is
        # left unspecialised, Dynamo recompiles for every layer and runs eager past its recompile limit. The
        # graphs: an input with or without grad (the first layer or the rest) x a padding mask or none x the first
        # shape met or any other (dynamic): ~8, so the limit is raised to 16. (`dynamic=True` from the start
        # compiled longer and ran 1.05x eager where this ran 1.2-1.3x: bench.compile, 2026-12-02.)
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, recompile_limit=16):
            yield
    finally:
        for i, layer in enumerate(eager):
            layers[i] = layer


def _step_loss(ml: MultiLora, rows: Sequence[TrainExample], row_slots: Sequence[int], weights: torch.Tensor,
               pad_id: int, seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Forward + backward of one chunk; returns each row's weighted loss (detached)."""
    model, device = ml.model, ml.scaling.device
    # right padding: causal attention never looks at it
    ids, mask, labels = right_pad([(r.input_ids, r.labels) for r in rows], pad_id, device)
    width = ids.shape[1]
    ml.active_route = ml.make_route(row_slots)
    if seeds is not None and ml.active_route.rows is None:  # training routes every row (no base-only rows)
        ml.active_route.keep = ml.dropout_mask(seeds, [len(r.input_ids) for r in rows], width)
    try:
        with compiled_layers(model), training_forward(model):
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        ml.active_route = None
    losses, picked = answer_cross_entropy(model, hidden, labels, reduction="none")
    row_of_token = picked.nonzero()[:, 0]
    weighted = losses * weights.to(device)[row_of_token]
    weighted.sum().backward()
    return torch.zeros(len(rows), dtype=weighted.dtype, device=device).index_add(0, row_of_token, weighted.detach())


def train_users_batched(ml: MultiLora, batches: Mapping[str, Sequence[Sequence[TrainExample]]], *, lr: float,
                        weight_decay: float = 0.0, warmup_ratio: float = 0.0, max_grad_norm: float | None = 1.0,
                        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                        schedule: Callable[[int, int, int], float] = linear_schedule, pad_id: int,
                        tokens_per_forward: int | None = None, seed: int = 0,
                        progress: Callable[[int, int, dict[str, float]], None] | None = None,
                        should_stop: Callable[[], bool] | None = None, checkpoint: Any = None
                        ) -> dict[str, list[float]]:
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
    `pad_id` pads the rows on the right (`oppu.train.training_pad_id(tokenizer)`). Returns each user's loss per
    step. `checkpoint` (an `oppu.checkpoint.Checkpoint`): each user's slot of the factors and of AdamW's
    moments, step counts and losses are saved there as training goes, and training continues from them.
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
    identity = {"users": sorted(users), "steps": n_steps, "totals": {u: totals[u] for u in sorted(users)},
                "shapes": [list(p.shape[1:]) for p in params]}
    start = 0
    state = checkpoint.load(identity) if checkpoint is not None else None
    if state is not None:
        start = _restore_slots(state, slots, params, opt, taken, history)
    was_training = ml.model.training
    ml.model.train()
    try:
        for step in range(start, n_steps):
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
            n_answer = {u: 0 for u in present}
            for r, u in zip(rows, row_user, strict=True):
                n_answer[u] += answer_tokens(r.labels)
            empty = [u for u, n in n_answer.items() if n == 0]
            if empty:
                raise MultiLoraError(f"users {empty[:3]} have no answer tokens in batch {step}: every example "
                                     "needs labels other than IGNORE_INDEX after its first token")
            weights = torch.tensor([1.0 / n_answer[u] for u in row_user], dtype=ml.scaling.dtype)
            per_row = torch.zeros(len(rows), dtype=ml.scaling.dtype)
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
            if checkpoint is not None and checkpoint.due(step + 1, n_steps):
                checkpoint.save(identity, _slot_state(step + 1, slots, params, opt, taken, history))
            if progress is not None:
                progress(step + 1, n_steps, losses)
    finally:
        ml.active_route = None
        ml.model.train(was_training)
        for p in params:
            p.grad = None
        for p in ml.model.parameters():
            if id(p) in frozen:
                p.requires_grad_(frozen[id(p)])
    return history


def _slot_state(step: int, slots: Mapping[str, int], params, opt: _SlotAdamW, taken: Mapping[str, int],
                history: Mapping[str, list[float]]) -> dict[str, Any]:
    """What a checkpoint keeps of each user: its slot of every factor and AdamW moment, its step count, losses."""
    return {"step": step, "users": {
        u: {"params": [p.detach()[s].clone() for p in params], "m": [m[s].clone() for m in opt.m],
            "v": [v[s].clone() for v in opt.v], "opt_steps": int(opt.steps[s]), "taken": int(taken[u]),
            "history": list(history[u])} for u, s in slots.items()}}


def _restore_slots(state: Mapping[str, Any], slots: Mapping[str, int], params, opt: _SlotAdamW,
                   taken: dict[str, int], history: dict[str, list[float]]) -> int:
    """Put a checkpoint's per-user state back into the users' (possibly different) slots; returns its step."""
    with torch.no_grad():
        for u, s in slots.items():
            saved = state["users"][u]
            for p, value in zip(params, saved["params"], strict=True):
                p[s].copy_(value)
            for m, value in zip(opt.m, saved["m"], strict=True):
                m[s].copy_(value)
            for v, value in zip(opt.v, saved["v"], strict=True):
                v[s].copy_(value)
            opt.steps[s] = int(saved["opt_steps"])
            taken[u] = int(saved["taken"])
            history[u] = [float(x) for x in saved["history"]]
    return int(state["step"])


def train_users(ml: MultiLora, tokenizer, task, users: Sequence[Any], style, peft_cfg, train_cfg, *,
                histories: Mapping[str, Sequence[Any]] | None = None, retriever=None,
                profiles: Mapping[str, str | None] | None = None, adapter_keys: Mapping[str, str] | None = None,
                progress: Callable[[str, int, int, float], None] | None = None,
                should_stop: Callable[[], bool] | None = None, checkpoint: Any = None) -> dict[str, Any]:
    """Drop-in for `oppu.train.train_users` on a `MultiLora`: the same examples (built from each user alone by
    `oppu.examples.user_examples`), encoding, batch order, schedule and clipping, with all users in one loop.

    Each user's adapter is created fresh in `ml` under its adapter key (default: the user id), seeded by
    `train_cfg.seed` (PEFT's initial distribution, not its exact random draw). Returns `oppu.train.TrainResult`
    per user id; `progress(stage, step, total, loss)` is called once per step and user, with stage
    `user:<id>:<style>` as in `oppu.train`. Raises `oppu.train.StopRequested` when `should_stop()` turns true.
    """
    from oppu.examples import trained_items, user_examples
    from oppu.train import StopRequested, TrainResult, answer_end_ids, encode_example, training_pad_id

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
    # Each user's own step after global step i, as the per-user loop counts it (an empty batch is no step).
    own_steps = {key: list(itertools.accumulate(1 if b else 0 for b in user_batches))
                 for key, user_batches in batches.items()}

    def stage(key: str) -> str:
        return f"user:{info[key][0]}:{style.key}"

    if progress is not None:
        saved = checkpoint.load_any() if checkpoint is not None else None
        at = int(saved["step"]) if saved is not None else 0
        for key, user_batches in batches.items():  # every user's total is known before its first step
            done = own_steps[key][min(at, len(own_steps[key])) - 1] if at and own_steps[key] else 0
            progress(stage(key), done, len(user_batches), None)

    def report(step: int, total: int, losses: dict[str, float]) -> None:
        # Each user's own step of its own total, as the per-user loop reports it (users differ in batch counts).
        for key, loss in losses.items():
            if progress is not None:
                progress(stage(key), own_steps[key][step - 1], len(batches[key]), loss)

    def stop() -> bool:
        if should_stop is not None and should_stop():
            stopped.append(True)
            return True
        return False

    history = train_users_batched(ml, batches, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                  warmup_ratio=train_cfg.warmup_ratio, max_grad_norm=train_cfg.max_grad_norm,
                                  pad_id=training_pad_id(tokenizer), seed=train_cfg.seed, progress=report,
                                  should_stop=stop, checkpoint=checkpoint)
    if stopped:
        raise StopRequested("stopped between two multi-user training steps")
    results = {}
    for key, (uid, examples, items) in info.items():
        item_ids, data_hash = trained_items(task, items, examples)
        results[uid] = TrainResult(user_id=uid, adapter=key, curve=list(enumerate(history[key], start=1)),
                                   examples=len(examples), item_ids=item_ids, data_hash=data_hash)
    return results
