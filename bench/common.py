"""Shared pieces of the benchmark scripts: machine facts, the matmul peak in the bench dtype, per-phase peak memory, timing,
the report table and its append to docs/bench-log/<date>.md, and the real default model with demo users.

Every benchmark measures its baseline and the project's path in the same process on the same inputs, and
reports ratios against that baseline, never against a number from another day or machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "bench-log" / f"{time.strftime('%Y-%m-%d', time.gmtime())}.md"
MODEL_CACHE = ROOT / ".cache" / "models"
DEMO_DATA = ROOT / "data" / "demo"
DEVICE_ENV = "OPPU_BENCH_DEVICE"
"""`cpu` (default) or `cuda`: where the benchmark model runs (scripts accept --device, which sets it)."""
RANDOM_MODEL_ENV = "OPPU_BENCH_RANDOM_MODEL"
"""A folder with the default model's config.json and tokenizer but no weights: build that architecture with
seeded random weights (an accelerator machine that cannot hold the 517 MB cache). Throughput is the same; a
random model never ends an answer early, so generation runs every row to its budget."""


DTYPE_ENV = "OPPU_BENCH_DTYPE"
"""`auto` (default: what a run's `dtype="auto"` computes in on this machine, `oppu.precision`), `float32` or
`bfloat16` (--dtype). Every path of a script runs in it, so its ratios compare engines, not precisions."""


def bench_device() -> str:
    return os.environ.get(DEVICE_ENV, "cpu")


def bench_dtype() -> str:
    """The dtype name the benchmark model computes in (`auto` resolved on this machine and device)."""
    from oppu.precision import compute_dtype

    return compute_dtype(os.environ.get(DTYPE_ENV, "auto"), bench_device(), MODEL_CACHE)


def sync() -> None:
    """Wait for queued accelerator work, so wall time covers it (no-op on CPU)."""
    import torch

    if bench_device() == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


# -- machine ---------------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers depend on; the load average shows whether others shared the CPU during the run."""
    import peft
    import torch
    import transformers

    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gib = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    gpu = torch.cuda.get_device_name(0) if bench_device() == "cuda" and torch.cuda.is_available() else None
    return {"cpu": _cpu_name() + (f" + GPU {gpu}" if gpu else ""), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "mem_gib": mem_gib, "cuda": torch.cuda.is_available(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "load_avg": tuple(round(x, 2) for x in os.getloadavg())}


def matmul_peak_gflops(n: int | None = None, seconds: float = 2.0, dtype=None) -> float:
    """Best GFLOP/s of an n x n matmul in `dtype` (default: the bench dtype) over about `seconds` on the bench
    device: the ceiling model FLOP rates are compared to (1024 on a CPU, 8192 on a GPU, large enough to fill
    either)."""
    import torch

    device = bench_device()
    n = n or (8192 if device == "cuda" else 1024)
    dtype = dtype or getattr(torch, bench_dtype())
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool and allocator
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


# -- memory and time -------------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next reading covers one phase only (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    """Peak resident memory since the last reset (or since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    """User + system CPU time of this process: less sensitive than wall time to other work on a shared CPU."""
    peak_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _cpu_time() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def phase(name: str) -> Iterator[Phase]:
    """Wall time and peak RSS of one block (the peak includes what was resident when it started)."""
    import gc

    gc.collect()
    reset_peak_rss()
    result = Phase(name)
    start, cpu_start = time.perf_counter(), _cpu_time()
    try:
        yield result
    finally:
        sync()
        result.seconds = time.perf_counter() - start
        result.cpu_seconds = _cpu_time() - cpu_start
        result.peak_mib = peak_rss_mib()
        print(f"  {name}: {result.seconds:.1f} s wall, {result.cpu_seconds:.1f} s CPU, "
              f"peak RSS {result.peak_mib or 0:.0f} MiB", flush=True)


def alternating(names: Sequence[Any], rounds: int) -> Iterator[tuple[int, Any]]:
    """(round, name) for every name in every round, the order reversed each round, so that no path always runs
    first (cold)."""
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            yield r, name


def run_rounds(paths: dict[str, Any], rounds: int) -> tuple[dict[str, Phase], dict[str, Any]]:
    """Run every path `rounds` times in `alternating` order; returns the fastest Phase of each path and each
    path's last result."""
    best: dict[str, Phase] = {}
    results: dict[str, Any] = {}
    for r, name in alternating(list(paths), rounds):
        with phase(f"{name} (round {r + 1})") as p:
            results[name] = paths[name]()
        if name not in best or p.seconds < best[name].seconds:
            best[name] = p
    return best, results


# -- report ----------------------------------------------------------------------------------------------------
def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of dicts (columns in first-seen order); floats get 3 significant-ish digits."""
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"{'MET' if met else 'MISSED'} (target {sign} {target:g})"


def _module_of(script: str) -> str:
    """`/…/bench/training.py` -> `bench.training` (what `python -m` was given)."""
    path = Path(script).resolve()
    with contextlib.suppress(ValueError):
        return ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return script


def append_report(title: str, table: str, notes: Sequence[str] = (), write: bool = True) -> None:
    """Print the section and append it to docs/bench-log/<date>.md with command, date and machine facts."""
    info = machine_info()
    command = " ".join(["python", "-m", _module_of(sys.argv[0]), *sys.argv[1:]]) if sys.argv else "?"
    shared = info["load_avg"][0] > (info["cores"] or 1) * 0.75
    lines = [f"\n### {title}", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: `{command}`",
             (f"- machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
              f"{info['mem_gib']} GiB, cuda={info['cuda']}, model dtype {bench_dtype()}; python {info['python']}, "
              f"torch {info['torch']}, "
              f"transformers {info['transformers']}, peft {info['peft']}"),
             f"- load average at the end: {info['load_avg']}"
             + (" (the CPU was SHARED with other work during this run)" if shared else ""), "", table]
    lines += ["", *[f"- {n}" for n in notes]] if notes else []
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if write:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        if not REPORT.exists():
            REPORT.write_text(f"# Benchmark log {REPORT.stem}: generated by the bench/ scripts and kept as a record; "
                              "never current (docs/PERFORMANCE.md holds the current figures).\n")
        with REPORT.open("a") as handle:
            handle.write(text)


# -- model and data --------------------------------------------------------------------------------------------
def load_default_model():
    """The embedded SmolLM2-135M default through oppu.model (converted once into the local cache), in the bench
    dtype on the bench device; with OPPU_BENCH_RANDOM_MODEL, the same architecture with seeded random weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = os.environ.get(RANDOM_MODEL_ENV)
    if folder:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder),
                                                 dtype=getattr(torch, bench_dtype()))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.to(bench_device()).eval()
        print(f"random weights of the architecture in {folder} ({RANDOM_MODEL_ENV})", flush=True)
        return model, tokenizer
    from oppu.config import ModelConfig
    from oppu.model import load_model

    return load_model(ModelConfig(device=bench_device(), dtype=bench_dtype()), MODEL_CACHE)


def add_device_argument(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help=f"where the model runs (default: ${DEVICE_ENV} or cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                        help=f"the base model's dtype, for every path alike (default: ${DTYPE_ENV} or auto: what "
                             "a run computes in on this machine)")


def apply_device_argument(args) -> None:
    if args.device:
        os.environ[DEVICE_ENV] = args.device
    if args.dtype:
        os.environ[DTYPE_ENV] = args.dtype


def demo_users(task_id: str, n: int) -> list:
    """`n` users of the embedded demo data: the test users first, then the task-adaptation users."""
    from oppu.data import load_task_data

    data = load_task_data(DEMO_DATA, task_id)
    users = list(data.test_users) + list(data.train_users)
    if len(users) < n:
        raise SystemExit(f"the demo data of {task_id} has {len(users)} users, fewer than the {n} asked for")
    return users[:n]


def random_lora_state(model, r: int, seed: int, targets: Sequence[str], scale: float = 0.02) -> dict:
    """A PEFT-format LoRA state dict with small non-zero A and B, so every user's adapter changes its answers."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, module.in_features, generator=gen) * scale
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, r, generator=gen) * scale
    return state
