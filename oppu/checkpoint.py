"""Training checkpoints: what a training stage needs to continue exactly where it stopped.

A `Checkpoint` is one folder holding `state.pt` (trainable tensors, optimizer and scheduler state, the step
reached, the loss curve so far, the torch RNG state). The training loops (`oppu.train.train_loop`,
`oppu.multilora.train_users_batched`) save one every `CHECKPOINT_EVERY` steps or `CHECKPOINT_S` seconds,
whichever comes first, and always after the last step, so a killed worker loses at most that much work.
A resumed loop loads it, skips the steps already taken and continues with the same optimizer moments,
schedule position and random stream: the adapter it ends with is the one an uninterrupted run ends with.

Writes are atomic (temp file in the same folder, fsync, `os.replace`); a file cut by a crash is never read.
A checkpoint records an `identity` (stage, step total, users): one written for other settings is ignored.
Task adaptation keeps its checkpoint beside the cached task LoRA, per-user training under
`ARTIFACTS/checkpoints/<task>/<run id>/...`; each is removed once what it protects is saved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from oppu.paths import safe_component

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = int(os.environ.get("OPPU_CHECKPOINT_EVERY", "25"))
"""Steps between two checkpoints of a training stage."""
CHECKPOINT_S = float(os.environ.get("OPPU_CHECKPOINT_S", "60"))
"""Seconds after which a checkpoint is written even if `CHECKPOINT_EVERY` steps have not passed."""
STATE_FILE = "state.pt"


class Checkpoint:
    """One training stage's checkpoint folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], every: int | None = None, every_s: float | None = None):
        self.folder = Path(folder)
        self.every = max(1, int(every or CHECKPOINT_EVERY))
        self.every_s = float(every_s if every_s is not None else CHECKPOINT_S)
        self._last = time.monotonic()
        self._cache: dict[str, Any] | None = None

    def child(self, name: object) -> Checkpoint:
        """The checkpoint of one part of this stage (a user of a per-user loop), with the same intervals."""
        return Checkpoint(self.folder / safe_component(name), self.every, self.every_s)

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    def load(self, identity: dict[str, Any]) -> dict[str, Any] | None:
        """The saved state when one exists for this `identity`, else None (an unreadable or foreign one is
        dropped with a log line: training then starts from step 0, never from a wrong state)."""
        if self._cache is not None and self._cache.get("identity") == identity:
            return self._cache
        if not self.path.is_file():
            return None
        import torch

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged checkpoint costs the steps it held, nothing else
            log.warning("checkpoint %s is unreadable (%s): training this stage from the start", self.path, err)
            return None
        if not isinstance(state, dict) or state.get("identity") != identity:
            log.warning("checkpoint %s was written for other settings: training this stage from the start",
                        self.path)
            return None
        self._cache = state
        return state

    def load_any(self) -> dict[str, Any] | None:
        """The saved state whatever it was written for (to announce where a stage will continue), or None."""
        if self._cache is not None:
            return self._cache
        if not self.path.is_file():
            return None
        import torch

        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - load() reports it when training asks
            return None

    def due(self, step: int, total: int) -> bool:
        """Whether a checkpoint should be written after `step` of `total`."""
        return step >= total or step % self.every == 0 or time.monotonic() - self._last >= self.every_s

    def save(self, identity: dict[str, Any], state: dict[str, Any]) -> None:
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{STATE_FILE}.tmp-{os.getpid()}"
        payload = {**state, "identity": identity}
        try:
            with open(tmp, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._cache = payload
        self._last = time.monotonic()

    def clear(self) -> None:
        """Remove the folder (what it protected is saved)."""
        self._cache = None
        shutil.rmtree(self.folder, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
