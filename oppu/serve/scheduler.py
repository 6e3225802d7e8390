"""Continuous batching over one `MultiLora`: a thread that owns the model, a queue in front of it.

Every loop turn the scheduler (1) drops cancelled rows, (2) admits waiting requests while the batch has room and
their adapters have slots (`AdapterCache`), prefills them together and appends them to the running batch's KV
cache, (3) runs ONE decode step for every running row, each routed to its own adapter, and (4) lets finished
rows leave (end token, token budget, cancellation). So a request that arrives while others decode starts at the
next step instead of waiting for the batch to end, and a short answer never waits for a long one.

The batch's KV cache stays left-aligned: rows of different lengths are left-padded, masked, and positioned by
their own counts, exactly as `oppu.multilora.decode` decodes a fixed batch, so a row's greedy answer does not
depend on which other rows share its steps (up to float rounding of the padded matmuls).

Results go back through each request's `emit(event)` callback, called from this thread: `("token", id)`,
`("done", finish_reason)` or `("error", exception)`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from oppu.errors import OppuError

log = logging.getLogger(__name__)

Event = tuple[str, Any]


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x: the name this version's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SchedulerStopped(OppuError, RuntimeError):
    """The server is shutting down; the request was not answered."""


@dataclass
class GenRequest:
    """One generation: prompt ids, the served model, decoding settings and where the tokens go."""

    ids: list[int]
    model: Any
    """`oppu.serve.registry.ServedModel`."""
    max_new_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Row:
    req: GenRequest
    slot: int
    generator: torch.Generator | None
    produced: int = 0
    last: int = -1
    """The token emitted last, fed at the next decode step."""


class Scheduler:
    """Owns `ml.model` on its own thread: submit requests from any thread, tokens come back by callback."""

    def __init__(self, ml, cache, eos_token_ids: list[int], pad_id: int, *, max_batch: int = 32):
        self.ml = ml
        self.cache = cache
        self.eos = set(eos_token_ids)
        self.pad_id = pad_id
        self.max_batch = max_batch
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._rows: list[_Row] = []
        self._kv = None
        self._mask: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._route = None
        self.steps = 0
        self.max_rows_seen = 0
        self._thread = threading.Thread(target=self._loop, name="oppu-serve-scheduler", daemon=True)
        self._thread.start()

    # -- API ------------------------------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if self._stop:
                raise SchedulerStopped("the server is shutting down")
            self._waiting.append(req)
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def stats(self) -> dict[str, int]:
        return {"running": len(self._rows), "waiting": len(self._waiting), "steps": self.steps,
                "max_rows_seen": self.max_rows_seen, "adapters_held": self.cache.held,
                "adapter_loads": self.cache.loads, "adapter_hits": self.cache.hits,
                "adapter_evictions": self.cache.evictions}

    # -- the loop -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        device = self.ml.scaling.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.ml.model.eval()
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._rows:
                    self._cv.wait()
                if self._stop:
                    break
            try:
                with torch.inference_mode():
                    self._turn()
            except Exception as exc:  # a bug or an out-of-memory: fail the rows in flight, keep serving
                log.exception("decode step failed")
                for row in self._rows:
                    self._finish(row, ("error", exc))
                self._reset()
        for row in self._rows:
            self._finish(row, ("error", SchedulerStopped("the server shut down before the answer ended")))
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in waiting:
            req.emit(("error", SchedulerStopped("the server shut down before the request started")))

    def _turn(self) -> None:
        self._drop([i for i, row in enumerate(self._rows) if row.req.cancelled.is_set()], "cancelled")
        new = self._admit()
        if new:
            self._prefill(new)
        if self._rows:
            self._decode_step()
        elif not new:
            time.sleep(0.005)  # only waiting requests whose adapters have no free slot: let rows drain

    def _admit(self) -> list[_Row]:
        new: list[_Row] = []
        with self._cv:
            while self._waiting and len(self._rows) + len(new) < self.max_batch:
                req = self._waiting[0]
                if req.cancelled.is_set():
                    self._waiting.popleft()
                    req.emit(("done", "cancelled"))
                    continue
                try:
                    slot = self.cache.acquire(req.model)
                except Exception as exc:  # noqa: BLE001 - any load failure is that request's answer
                    self._waiting.popleft()
                    req.emit(("error", exc))
                    continue
                if slot is None:
                    break  # every slot pinned by running rows: wait for one to finish
                self._waiting.popleft()
                gen = None
                if req.temperature > 0:
                    gen = torch.Generator(device=self.ml.scaling.device)
                    gen.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % 2**63))
                new.append(_Row(req, slot, gen))
        return new

    def _pick(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        picked = logits.argmax(-1)
        for i, row in enumerate(rows):
            if row.generator is None:
                continue
            scores = logits[i].float() / row.req.temperature
            if row.req.top_p < 1.0:
                ordered, index = scores.sort()
                drop = ordered.softmax(-1).cumsum(-1) <= 1 - row.req.top_p
                drop[-1] = False
                scores = scores.masked_fill(drop.scatter(0, index, drop), float("-inf"))
            picked[i] = torch.multinomial(scores.softmax(-1), 1, generator=row.generator)[0]
        return picked.tolist()

    def _prefill(self, new: list[_Row]) -> None:
        from transformers import DynamicCache

        from oppu.generate import left_pad
        model = self.ml.model
        ids, mask = left_pad([row.req.ids for row in new], self.pad_id, self.ml.scaling.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kv = DynamicCache(config=model.config)
        previous = self.ml.active_route
        try:
            self.ml.active_route = self.ml.make_route([row.slot for row in new])
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **{cache_kwarg(model): kv}).logits[:, -1]
        finally:
            self.ml.active_route = previous
        self._join(new, kv, mask, positions[:, -1] + 1)
        self._emit_step(new, self._pick(new, logits), offset=len(self._rows) - len(new))

    def _join(self, new: list[_Row], kv, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Append the prefilled rows to the running batch: both caches left-padded to one width."""
        if not self._rows:
            self._kv, self._mask, self._pos = kv, mask, next_pos
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            pad_old, pad_new = width - self._mask.shape[1], width - mask.shape[1]
            for old_layer, new_layer in zip(self._kv.layers, kv.layers, strict=True):
                for name in ("keys", "values"):
                    old_t, new_t = getattr(old_layer, name), getattr(new_layer, name)
                    setattr(old_layer, name, torch.cat([F.pad(old_t, (0, 0, pad_old, 0)),
                                                        F.pad(new_t, (0, 0, pad_new, 0))]))
            self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])
            self._pos = torch.cat([self._pos, next_pos])
        self._rows.extend(new)
        self._route = None
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))

    def _decode_step(self) -> None:
        model = self.ml.model
        if self._route is None:
            self._route = self.ml.make_route([row.slot for row in self._rows])
        tokens = torch.tensor([[row.last] for row in self._rows], dtype=torch.long, device=self._mask.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        previous = self.ml.active_route
        try:
            self.ml.active_route = self._route
            logits = model(input_ids=tokens, attention_mask=self._mask, position_ids=self._pos[:, None],
                           use_cache=True, **{cache_kwarg(model): self._kv}).logits[:, -1]
        finally:
            self.ml.active_route = previous
        self._pos = self._pos + 1
        self.steps += 1
        self._emit_step(list(self._rows), self._pick(self._rows, logits), offset=0)

    def _emit_step(self, rows: list[_Row], picked: list[int], offset: int) -> None:
        finished: list[tuple[int, str]] = []
        for i, (row, token) in enumerate(zip(rows, picked, strict=True)):
            row.produced += 1
            row.last = token
            if token in self.eos:
                finished.append((offset + i, "stop"))
                continue
            row.req.emit(("token", token))
            if row.produced >= row.req.max_new_tokens:
                finished.append((offset + i, "length"))
        for reason in ("stop", "length"):
            self._drop([i for i, r in finished if r == reason], reason)

    def _drop(self, indices: list[int], reason: str) -> None:
        """Rows leave the batch (and the KV cache); leading columns no remaining row needs are cut."""
        if not indices:
            return
        gone = set(indices)
        for i in sorted(gone):
            self._finish(self._rows[i], ("done", reason))
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask[index]
        lead = int(mask.any(0).nonzero()[0])
        self._mask, self._pos = mask[:, lead:], self._pos[index]
        for layer in self._kv.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            layer.keys = layer.keys[index, :, lead:]
            layer.values = layer.values[index, :, lead:]
        self._rows = [self._rows[i] for i in keep]
        self._route = None

    def _finish(self, row: _Row, event: Event) -> None:
        self.cache.release(row.req.model)
        try:
            row.req.emit(event)
        except Exception:  # a client's callback must never stop the model thread
            log.exception("emit failed")

    def _reset(self) -> None:
        self._rows, self._kv, self._mask, self._pos, self._route = [], None, None, None, None
