"""What `dtype="auto"` computes in on the machine at hand: bf16 where it is measured to pay, fp32 where not.

- CUDA: bfloat16.
- CPU: whether bf16 beats fp32 depends on the CPU's native bf16 support (AMX or `avx512_bf16`: faster; an
  AVX2-only CPU converts every operand and is far slower). Flags do not say how much, so `auto` decides by a short
  measured probe: one SwiGLU MLP block of the default model's shapes (SmolLM2-135M: 576 -> 1536 -> 576) over a
  256-token pass, in fp32 and in bf16, best of alternating rounds for about a second. bf16 is chosen when it is at
  least `BF16_MIN_SPEEDUP` times faster (a model gains less than the block).
- The verdict is cached in the model cache (`<cache>/precision/<machine key>.json`, written by `oppu prepare` or
  by the first run), keyed by the CPU model, its flags and the torch version: the same machine resolves `auto`
  the same way run after run, and another machine or torch build probes again.
- `OPPU_AUTO_DTYPE=float32|bfloat16` pins what `auto` means on a CPU without probing (the test suite pins
  float32, so its fp32 exactness checks do not change with the CPU).

Whatever the base computes in, LoRA factors stay fp32 master weights (`oppu.multilora.factor_dtype`, PEFT's
`autocast_adapter_dtype`) and saved adapters are fp32; every run records the dtype it ran in
(`ModelConfig.compute_dtype` in the stored config, `compute_dtype` in each adapter manifest).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

AUTO_DTYPE_ENV = "OPPU_AUTO_DTYPE"
BF16_MIN_SPEEDUP = 1.5
"""bf16 must make the probe's MLP block this much faster than fp32 for `auto` to take it on a CPU. A whole run
gains less than the block (its element-wise layers and the fp32 LoRA path gain little), so the bar sits well
above 1x, and well below what CPUs with native bf16 measure, so that a probe run beside other work cannot flip
the verdict: on the AMX Xeon the block measured 8-12x and a default 8-user run 1.81x; on a Zen 4 EPYC with
`avx512_bf16` (no AMX) the block 2.06-2.20x (seven probes) and the same run 1.76x (`bench.engines
--fp32-baseline`); an AVX2-only EPYC runs bf16 matmuls far slower than fp32."""
PROBE_SHAPE = (256, 576, 1536)
"""(tokens, hidden, intermediate) of the probe's MLP block: a 256-token training pass of SmolLM2-135M."""
PROBE_SECONDS = 1.0
_PROBE_FORMAT = 2  # bump when the probe or its bar changes, so cached verdicts are measured again
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Probe:
    """One measurement: the best time of the MLP block in each dtype and what `auto` takes from it."""

    fp32_s: float
    bf16_s: float
    threads: int

    @property
    def speedup(self) -> float:
        """fp32 time / bf16 time (> 1: bf16 is faster)."""
        return self.fp32_s / self.bf16_s if self.bf16_s > 0 else 0.0

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.speedup >= BF16_MIN_SPEEDUP else "float32"


# -- the machine -----------------------------------------------------------------------------------------------
def cpu_facts() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, its sorted feature flags) from /proc/cpuinfo (x86 `flags`, Arm `Features`)."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            found.setdefault(key.strip(), value.strip())
    name = found.get("model name") or platform.processor() or platform.machine()
    return name, tuple(sorted((found.get("flags") or found.get("Features") or "").split()))


def machine_key() -> str:
    """Short hash of what a bf16 verdict depends on: CPU model, CPU flags, torch version (and the probe's format)."""
    import torch

    name, flags = cpu_facts()
    text = json.dumps([_PROBE_FORMAT, name, flags, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the probe ---------------------------------------------------------------------------------------------------
def probe_cpu(seconds: float = PROBE_SECONDS, shape: tuple[int, int, int] = PROBE_SHAPE) -> Probe:
    """Time one SwiGLU MLP block (gate and up projections, SiLU times up, down projection) in fp32 and bf16 on
    the same inputs, alternating, for about `seconds`; the best of each (other work only ever adds time)."""
    import torch

    tokens, hidden, inter = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen)
    w_gate = torch.randn(hidden, inter, generator=gen) / hidden**0.5
    w_up = torch.randn(hidden, inter, generator=gen) / hidden**0.5
    w_down = torch.randn(inter, hidden, generator=gen) / inter**0.5
    operands = {dt: [t.to(dt) for t in (x, w_gate, w_up, w_down)] for dt in (torch.float32, torch.bfloat16)}

    def block(a, g, u, d):
        return (torch.nn.functional.silu(a @ g) * (a @ u)) @ d

    threads = torch.get_num_threads()
    # One thread: the ratio a core's bf16 support gives, and on a CPU shared with other work a single thread is
    # rarely stalled at a barrier waiting for a descheduled sibling (2 threads under load measured 1.0x where
    # 1 thread measured 6x on the same AMX Xeon).
    torch.set_num_threads(1)
    try:
        best = _best_times(block, operands, seconds)
    finally:
        torch.set_num_threads(threads)
    return Probe(fp32_s=best[torch.float32], bf16_s=best[torch.bfloat16], threads=1)


def _best_times(block, operands, seconds: float) -> dict:
    import torch

    best = {dt: float("inf") for dt in operands}
    with torch.inference_mode():
        for dt in operands:  # warm-up: thread pool, allocator, oneDNN kernel selection
            block(*operands[dt])
        deadline = time.perf_counter() + seconds
        rounds = 0
        while rounds < 4 or (time.perf_counter() < deadline and rounds < 200):
            for dt in (operands if rounds % 2 == 0 else list(operands)[::-1]):
                start = time.perf_counter()
                block(*operands[dt])
                best[dt] = min(best[dt], time.perf_counter() - start)
            rounds += 1
    return best


# -- the cached verdict ------------------------------------------------------------------------------------------
def verdict_path(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "precision" / f"{machine_key()}.json"


def read_verdict(cache_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The cached probe of this machine, or None when this machine (CPU, flags, torch) was never probed here."""
    path = verdict_path(cache_dir)
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if data.get("dtype") in DTYPES:
            return data
    return None


def probe_and_cache(cache_dir: str | os.PathLike, force: bool = False) -> dict[str, Any]:
    """The cached verdict of this machine, measuring it first when there is none (or `force`). A lock makes
    concurrent first runs measure once and agree."""
    from oppu.paths import file_lock, write_json_atomic

    path = verdict_path(cache_dir)
    if not force and (cached := read_verdict(cache_dir)) is not None:
        return cached
    with file_lock(path.with_suffix(".lock")):
        if not force and (cached := read_verdict(cache_dir)) is not None:
            return cached
        import torch

        probe = probe_cpu()
        name, flags = cpu_facts()
        bf16_flags = [f for f in flags if "bf16" in f or f.startswith("amx")]
        data = {"dtype": probe.dtype, "speedup": round(probe.speedup, 3), **asdict(probe),
                "min_speedup": BF16_MIN_SPEEDUP, "shape": list(PROBE_SHAPE), "cpu": name,
                "bf16_flags": bf16_flags, "torch": torch.__version__, "key": machine_key(),
                "probed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json_atomic(path, data)
        return data


def auto_dtype(device: str, cache_dir: str | os.PathLike = ".cache/models") -> str:
    """What `auto` computes in on `device` (`cpu` or `cuda`, already resolved)."""
    if device == "cuda":
        return "bfloat16"
    pinned = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if pinned:
        if pinned not in DTYPES:
            from oppu.config import ConfigError

            raise ConfigError(f"{AUTO_DTYPE_ENV}={pinned!r}: use one of {', '.join(DTYPES)} or unset it")
        return pinned
    return str(probe_and_cache(cache_dir)["dtype"])


def compute_dtype(dtype: str, device: str, cache_dir: str | os.PathLike = ".cache/models") -> str:
    """The dtype name a model configured with `dtype` computes in on `device` (`auto` resolved here)."""
    if dtype != "auto":
        return dtype
    from oppu.model import resolve_device

    return auto_dtype(resolve_device(device), cache_dir)
