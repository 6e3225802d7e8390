"""Training attention on this machine: `sdpa`, Hugging Face's eager and the lean eager attention for one LoRA
training step of the default model.

What `oppu.attention.training_attention` rests on. One step is the decoder's forward and backward through LoRA r=8
on q_proj/v_proj (multi-LoRA, two users' rows) with the loss on 8 positions per row, base weights frozen, as a
training pass runs it. For each dtype (fp32, bf16) and shape (rows x tokens) the attentions are timed one after
another on the same ids, each the best of `--repeats` after a warm-up; the speed-up is sdpa's time over lean
eager's (> 1: lean eager is faster). Also printed: the forward alone, and which attention the rule picks for that
dtype on this device. Not part of `python -m bench` (no target rides on it).
"""

from __future__ import annotations

import argparse
import os

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
    add_device_argument(parser)
    args = parser.parse_args(argv)
    apply_device_argument(args)
    os.environ[DTYPE_ENV] = "float32"  # loaded once in fp32; each dtype is a cast of it

    import torch

    from oppu.attention import LEAN_EAGER, training_attention
    from oppu.config import PeftConfig
    from oppu.multilora import MultiLora

    model, _ = load_default_model()
    gen = torch.Generator().manual_seed(0)
    rows = []
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
        model = ml.unwrap()
    notes = [("one training step: decoder forward + backward, LoRA r=8 on q_proj/v_proj (multi-LoRA, rows alternating "
              "between two adapters), loss on 8 positions per row, base frozen; best of "
              f"{args.repeats} after a warm-up, the attentions one after another on the same ids"),
             (f"eager: Hugging Face's; lean eager ({LEAN_EAGER}): the same forward keeping one 16-bit copy of the "
              "probabilities for backward (oppu.attention); speed-up: sdpa's step time over lean eager's"),
             "rule picks: oppu.attention.training_attention for a model of that dtype on this device"]
    append_report("Training attention: sdpa against eager", markdown_table(rows), notes, write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
