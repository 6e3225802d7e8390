"""LoRA dropout masks on this CPU: how long one training row's keep-mask takes to draw, three ways.

What `oppu.multilora.model.row_keep_mask` rests on. Every training row draws its own mask from its own seed (so
users trained together do not couple), 34,560 columns for SmolLM2-135M's q_proj and v_proj (30 layers x 2 x
576) at each of its tokens. Timed on the same seeds, one after another, best of `--repeats`:
- `row_keep_mask`: SFC64's raw 64-bit outputs read as 16-bit elements, compared with the drop threshold;
- the same bits through numpy's `Generator.bytes` (how the masks were drawn before; equal masks);
- torch's float `rand` compared with p (the first draw, with torch's own generator per row).
Not part of `python -m bench` (no target rides on it).
"""

from __future__ import annotations

import argparse
import time

from bench.common import append_report, markdown_table

COLUMNS = 34_560


def best_ms(fn, repeats: int) -> float:
    fn(0)  # warm-up: allocator, numpy and torch thread pools
    times = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        fn(seed)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.masks", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="64,128,256", help="row lengths to time, comma-separated")
    parser.add_argument("--p", type=float, default=0.05, help="the drop rate (RunConfig's LoRA dropout)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to the dated log in docs/bench-log/")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from oppu.multilora.model import DROP_RESOLUTION, row_keep_mask

    threshold = round(args.p * DROP_RESOLUTION)
    rows = []
    for length in (int(t) for t in args.tokens.split(",")):
        def via_bytes(seed, length=length):
            raw = np.random.Generator(np.random.SFC64(seed)).bytes(2 * length * COLUMNS)
            return torch.from_numpy((np.frombuffer(raw, dtype=np.uint16) >= threshold).reshape(length, COLUMNS))

        def via_rand(seed, length=length):
            return torch.rand(length, COLUMNS, generator=torch.Generator().manual_seed(seed)) >= args.p

        assert torch.equal(row_keep_mask(3, length, COLUMNS, args.p), via_bytes(3)), "the two numpy draws differ"
        ms = {"row_keep_mask": best_ms(lambda s, n=length: row_keep_mask(s, n, COLUMNS, args.p), args.repeats),
              "bytes": best_ms(via_bytes, args.repeats), "rand": best_ms(via_rand, args.repeats)}
        rows.append({"tokens x columns": f"{length} x {COLUMNS}", "row_keep_mask ms": ms["row_keep_mask"],
                     "Generator.bytes ms": ms["bytes"], "torch rand ms": ms["rand"],
                     "vs bytes": ms["bytes"] / ms["row_keep_mask"], "vs rand": ms["rand"] / ms["row_keep_mask"]})
        print(rows[-1], flush=True)
    notes = [f"drop rate {args.p}; best of {args.repeats} seeds after a warm-up; one row's mask per call",
             "row_keep_mask and Generator.bytes give equal masks (checked above); rand draws other ones",
             f"torch threads: {torch.get_num_threads()} (numpy's draw is one thread)"]
    append_report("LoRA dropout masks: one training row", markdown_table(rows), notes, write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
