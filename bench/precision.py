"""fp32 against bf16 on this machine: one training step and one prefill of the default model, same inputs.

What `--dtype bfloat16` would buy before choosing it: it depends on the CPU's native bf16 support (AMX or
avx512_bf16: faster than fp32; an AVX2-only AMD EPYC: far slower). Three training variants: fp32; bf16 autocast over
fp32 weights (what the official OPPU script's `TrainingArguments(bf16=True)` does); a bf16 model. Each is the
best of `--repeats` runs, after a warm-up. Also printed: the matmul peak in each dtype
(`bench.common.matmul_peak_gflops`), whose ratio is the most bf16 can speed up a step's weight matmuls on this CPU,
and the bound that ratio sets on a whole step (`speedup_bound`). Not part of `python -m bench` (no target rides on
it).
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import (
    DTYPE_ENV,
    add_device_argument,
    append_report,
    apply_device_argument,
    bench_device,
    load_default_model,
    markdown_table,
    matmul_peak_gflops,
)


def best_time(fn, repeats: int) -> float:
    from bench.common import sync

    fn()  # warm-up: thread pool, allocator, oneDNN kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def speedup_bound(matmul_share: float, matmul_speedup: float) -> float:
    """The most a step can gain when its matmuls, `matmul_share` of its time, get `matmul_speedup` faster and the
    rest of its work costs what it did (Amdahl's law): what bf16 alone can buy a float32 step."""
    return 1.0 / (matmul_share / matmul_speedup + (1.0 - matmul_share))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to the dated log in docs/bench-log/")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    apply_device_argument(args)
    os.environ[DTYPE_ENV] = "float32"  # loaded in fp32; the bf16 variants are made from it below

    import torch

    from oppu.precision import BF16_MIN_SPEEDUP, probe_cpu

    probe = probe_cpu() if bench_device() == "cpu" else None
    model, _ = load_default_model()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    train_ids = torch.randint(100, 20000, (4, 128), generator=gen).to(device)
    prefill_ids = torch.randint(100, 20000, (16, 200), generator=gen).to(device)
    for p in model.parameters():
        p.requires_grad_(False)

    def train_step(m, autocast: bool) -> None:
        # Gradient into one projection is enough to run the whole backward through the body.
        weight = m.model.layers[0].self_attn.q_proj.weight
        weight.requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden = m.get_decoder()(input_ids=train_ids).last_hidden_state
            loss = hidden.float().pow(2).mean()
        loss.backward()
        weight.grad = None
        weight.requires_grad_(False)

    def prefill(m) -> None:
        with torch.no_grad():
            m(input_ids=prefill_ids, logits_to_keep=1)

    rows = [{"work": "training step, 4 x 128 tokens", "fp32 s": best_time(lambda: train_step(model, False), args.repeats),
             "bf16 autocast s": best_time(lambda: train_step(model, True), args.repeats)}]
    fp32_prefill = best_time(lambda: prefill(model), args.repeats)
    model.to(torch.bfloat16)
    rows[0]["bf16 model s"] = best_time(lambda: train_step(model, False), args.repeats)
    rows.append({"work": "prefill, 16 x 200 tokens", "fp32 s": fp32_prefill,
                 "bf16 model s": best_time(lambda: prefill(model), args.repeats)})
    for row in rows:
        row["bf16 model speed-up"] = row["fp32 s"] / row["bf16 model s"]
    notes = [f"best of {args.repeats} runs after a warm-up; random token ids; the model's own weights",
             "bf16 autocast keeps fp32 weights and runs matmuls in bf16, as the official script trained"]
    fp32_peak, bf16_peak = (matmul_peak_gflops(dtype=dt) for dt in (torch.float32, torch.bfloat16))
    ratio = bf16_peak / fp32_peak
    notes.append(f"matmul peak (`bench.common.matmul_peak_gflops`): fp32 {fp32_peak:.0f} GFLOP/s, bf16 "
                 f"{bf16_peak:.0f} GFLOP/s, {ratio:.2f}x: with the rest of a step as slow as in fp32, a step whose "
                 f"matmuls are 60 / 70 / 80% of its fp32 time gains at most "
                 + " / ".join(f"{speedup_bound(m, ratio):.2f}x" for m in (0.6, 0.7, 0.8)) + " in bf16")
    if probe is not None:
        notes.append(f"oppu.precision's probe (what dtype=auto decides by): bf16 {probe.speedup:.2f}x fp32 on its "
                     f"one-thread MLP block, {BF16_MIN_SPEEDUP:g}x needed -> auto = {probe.dtype}")
    append_report("Precision: fp32 against bf16", markdown_table(rows), notes, write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
