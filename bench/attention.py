"""Training attention on this machine: `sdpa`, Hugging Face's eager and the lean eager attention for one LoRA
training step of the default model.

What `oppu.attention.training_attention` rests on. One step is the decoder's forward and backward through LoRA r=8
on q_proj/v_proj (multi-LoRA, two users' rows) with the loss on 8 positions per row, base weights frozen, as a
training pass runs it. For each dtype (fp32, bf16) and shape (rows x tokens) the attentions are timed one after
another on the same ids, each the best of `--repeats` after a warm-up; the speed-up is sdpa's time over lean
eager's (> 1: lean eager is faster). Also printed: the forward alone, and which attention the rule picks for that
dtype on this device. `--profile` adds, per dtype, torch.profiler's top operators over one lean eager step of the
largest shape and the rate its weight matmuls (`aten::mm`) ran at against the machine's matmul peak in that
dtype: where a step's time goes on this CPU. Not part of `python -m bench` (no target rides on it).
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
    load_default_model,
    markdown_table,
)
from bench.precision import best_time

SHAPES = ((1, 64), (2, 128), (1, 256), (4, 128))


def training_step(model, ml, ids, backward: bool = True) -> None:
    """One LoRA training step's forward (and backward) on `ids`, rows alternating between two adapters."""
    import torch

    ml.active_route = ml.make_route([i % 2 for i in range(ids.shape[0])])
    try:
        with torch.set_grad_enabled(backward):
            hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        ml.active_route = None
    if backward:
        logits = model.get_output_embeddings()(hidden[:, -8:].reshape(-1, hidden.shape[-1]))
        logits.float().logsumexp(-1).mean().backward()


def profile_step(model, ml, ids, dtype) -> str:
    """Top operators (share of self CPU time) of one training step, and the weight matmuls' rate: their FLOPs
    (2 m k n each, from the recorded shapes) over their self CPU time (each op's time on the calling thread,
    its intra-op threads inside), against `matmul_peak_gflops` in the same dtype."""
    from torch.profiler import ProfilerActivity, profile

    from bench.common import matmul_peak_gflops
    from bench.generation import profile_top

    training_step(model, ml, ids)  # warm
    top = profile_top(lambda: training_step(model, ml, ids), n=8)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        training_step(model, ml, ids)
        step_s = time.perf_counter() - start
    flops, mm_s = 0.0, 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key == "aten::mm" and len(event.input_shapes) >= 2 and len(event.input_shapes[0]) == 2:
            (m, k), (_, n) = event.input_shapes[0], event.input_shapes[1]
            flops += 2.0 * m * k * n * event.count
            mm_s += event.self_cpu_time_total / 1e6
    peak = matmul_peak_gflops(dtype=dtype)
    rate = flops / mm_s / 1e9 if mm_s else 0.0
    against = f" ({rate / peak:.0%} of the {peak:.0f} GFLOP/s peak)"
    return (f"step {1000 * step_s:.0f} ms; aten::mm {1000 * mm_s:.0f} ms at {rate:.0f} GFLOP/s{against}; "
            f"top operators: {top}")


def timed(model, ml, attention: str, ids, repeats: int, backward: bool = True) -> float:
    """Best time of `training_step` with `attention` set on the model (its own attention back after)."""
    from oppu.attention import attention_set

    with attention_set(model, attention):
        return best_time(lambda: training_step(model, ml, ids, backward), repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to the dated log in docs/bench-log/")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one lean eager step per dtype: top operators, matmul rate against the peak")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    apply_device_argument(args)
    os.environ[DTYPE_ENV] = "float32"  # loaded once in fp32; each dtype is a cast of it

    import torch

    from oppu.attention import LEAN_EAGER, attention_set, training_attention
    from oppu.config import PeftConfig
    from oppu.multilora import MultiLora

    model, _ = load_default_model()
    gen = torch.Generator().manual_seed(0)
    rows, profiles = [], []
    for dtype_name in args.dtypes.split(","):
        model.to(getattr(torch, dtype_name))
        ml = MultiLora.from_peft_config(model, PeftConfig(dropout=0.0), capacity=2)
        for i in range(2):
            ml.add(f"user{i}", seed=i)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in ml.parameters():
            p.requires_grad_(True)
        model.train()
        device = next(model.parameters()).device
        for n_rows, n_tokens in SHAPES:
            ids = torch.randint(100, 20000, (n_rows, n_tokens), generator=gen).to(device)
            step = {name: timed(model, ml, name, ids, args.repeats) for name in ("sdpa", "eager", LEAN_EAGER)}
            forward = {name: timed(model, ml, name, ids, args.repeats, backward=False)
                       for name in ("sdpa", LEAN_EAGER)}
            rows.append({"dtype": dtype_name, "rows x tokens": f"{n_rows} x {n_tokens}",
                         "sdpa step ms": 1000 * step["sdpa"], "eager step ms": 1000 * step["eager"],
                         "lean eager step ms": 1000 * step[LEAN_EAGER],
                         "lean eager speed-up": step["sdpa"] / step[LEAN_EAGER],
                         "sdpa forward ms": 1000 * forward["sdpa"], "lean eager forward ms": 1000 * forward[LEAN_EAGER],
                         "rule picks": training_attention(model) or model.config._attn_implementation})
            print(rows[-1], flush=True)
        if args.profile:
            with attention_set(model, LEAN_EAGER):
                profiles.append(f"{dtype_name}, one {n_rows} x {n_tokens} step: "
                                + profile_step(model, ml, ids, getattr(torch, dtype_name)))
            print(profiles[-1], flush=True)
        model = ml.unwrap()
    notes = [("one training step: decoder forward + backward, LoRA r=8 on q_proj/v_proj (multi-LoRA, rows alternating "
              "between two adapters), loss on 8 positions per row, base frozen; best of "
              f"{args.repeats} after a warm-up, the attentions one after another on the same ids"),
             (f"eager: Hugging Face's; lean eager ({LEAN_EAGER}): the same forward keeping one 16-bit copy of the "
              "probabilities for backward (oppu.attention); speed-up: sdpa's step time over lean eager's"),
             "rule picks: oppu.attention.training_attention for a model of that dtype on this device",
             *[f"torch.profiler, {line}" for line in profiles]]
    append_report("Training attention: sdpa against eager", markdown_table(rows), notes, write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
