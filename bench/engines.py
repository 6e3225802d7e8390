"""The run's two engines on one real run: gathered multi-LoRA (`batching="multi_lora"`) against PEFT's per-user
loop (`batching="per_user"`), both through `oppu.experiment.run_experiment`, in one process on the same inputs.

Workload (defaults): the 8 most active LaMP_2M demo test users (one chunk), the run's default methods (none, RAG,
OPPU, OPPU+RAG: two adapters per user, one per prompt style), the run's per-user training settings, every query
answered greedily; no task adaptation (the same for both engines and not what they differ in), the project's own
dtype (`auto`, or `--dtype`). This is the measurement `batching="auto"` rests on (`oppu.banks.resolve_batching`).

Target: multi-LoRA >= 1.3x the per-user engine in wall time. Also reported: CPU time, the training and answering
split, and how many answers the two engines share (they need not be identical: dropout masks and batch rounding
differ).

`--fp32-baseline` adds a third run: the multi-LoRA engine in float32, what `dtype="auto"` gave on every CPU before
the precision policy (`oppu.precision`) chose bf16 where the CPU computes it natively. The rest of the code is
today's in both, so the ratio is what the precision policy alone gives (no target of its own: the default run's
2x is measured against the older code itself, by `bench.versus`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

from bench.common import (
    DEMO_DATA,
    MODEL_CACHE,
    add_device_argument,
    append_report,
    apply_device_argument,
    bench_device,
    bench_dtype,
    markdown_table,
    run_rounds,
    verdict,
)

TARGET_SPEEDUP = 1.3
ENGINES = ("multi_lora", "per_user")
FP32 = "multi_lora, float32"


def engine_run(cfg, engine: str, workdir: Path, dtype: str | None = None):
    """One `run_experiment` with `engine` (and `dtype` instead of the config's); returns (stage clock,
    {(user, method, query): output})."""
    from bench.e2e import StageClock
    from oppu.experiment import run_experiment
    from oppu.store import Store

    folder = workdir / engine
    cfg = cfg.replace(batching=engine, db=str(folder / "runs.duckdb"), artifacts_dir=str(folder / "artifacts"))
    if dtype is not None:
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, dtype=dtype))
    store = Store(cfg.db)
    clock = StageClock()
    run_id = run_experiment(cfg, progress=clock, store=store)
    answers = {}
    for uid in cfg.user_ids:
        frame = store.predictions_for(run_id, uid)
        answers.update({(uid, row.method, str(row.query_id)): row.output for row in frame.itertuples()})
    return clock, answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="LaMP_2M")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--items", type=int, default=None, help="default: RunConfig().user_train.max_examples")
    parser.add_argument("--epochs", type=int, default=None, help="default: RunConfig().user_train.epochs")
    parser.add_argument("--methods", default=None, help="comma-separated (default: RunConfig().methods)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each engine, order alternating")
    parser.add_argument("--fp32-baseline", action="store_true",
                        help="also run multi_lora in float32 (the default before the precision policy): target 2x")
    parser.add_argument("--tokens-per-forward-16bit", type=int, default=None,
                        help="padded tokens per training pass of a 16-bit model on a CPU, for both engines "
                             "(default: oppu.train.TOKENS_PER_FORWARD_16BIT): a whole run's peak RSS at another size")
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to docs/bench-log/")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    apply_device_argument(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OPPU_MODEL_CACHE", str(MODEL_CACHE))  # read by oppu.experiment at import

    import oppu.train
    from bench.common import load_default_model
    from bench.e2e import pick_users
    from oppu.config import ModelConfig, RunConfig

    if args.tokens_per_forward_16bit:
        # read by oppu.train.tokens_per_forward_for at every training loop, so the whole run in this process uses it
        oppu.train.TOKENS_PER_FORWARD_16BIT = args.tokens_per_forward_16bit
    defaults = RunConfig()
    changes = {k: v for k, v in (("max_examples", args.items), ("epochs", args.epochs)) if v is not None}
    users = pick_users(args.task, args.users)
    cfg = RunConfig(task=args.task, user_ids=tuple(str(u.id) for u in users), data_dir=str(DEMO_DATA),
                    methods=tuple(args.methods.split(",")) if args.methods else defaults.methods,
                    model=ModelConfig(device=bench_device(), dtype=bench_dtype()), task_adaptation=False,
                    user_train=dataclasses.replace(defaults.user_train, **changes), tag="bench-engines")
    n_queries = sum(len(u.queries) for u in users) * len(cfg.methods)
    print(f"{len(users)} users, {n_queries} answers ({', '.join(cfg.methods)}), {cfg.user_train.max_examples} items "
          f"x {cfg.user_train.epochs} epochs, {bench_dtype()}", flush=True)
    load_default_model()  # the model file in the page cache before either engine loads it
    with tempfile.TemporaryDirectory(prefix="oppu-bench-engines-") as tmp:
        runs = {e: (lambda e=e: engine_run(cfg, e, Path(tmp) / e)) for e in ENGINES}
        if args.fp32_baseline:
            runs[FP32] = lambda: engine_run(cfg, "multi_lora", Path(tmp) / "fp32", dtype="float32")
        best, results = run_rounds(runs, args.rounds)
    ours, theirs = best["multi_lora"], best["per_user"]
    (our_clock, our_answers), (their_clock, their_answers) = results["multi_lora"], results["per_user"]
    same = sum(our_answers.get(k) == v for k, v in their_answers.items())
    speedup = theirs.seconds / ours.seconds
    rows = []
    shown = [("per_user (PEFT, one user at a time)", theirs, their_clock),
             ("multi_lora (gathered, users together)", ours, our_clock)]
    if args.fp32_baseline:
        shown.append((f"{FP32} (the default before the precision policy)", best[FP32], results[FP32][0]))
    for engine, p, clock in shown:
        rows.append({"engine": engine, "wall s": p.seconds, "CPU s": p.cpu_seconds, "train s": clock.train_s,
                     "answer s": clock.rest_s, "speed-up (wall)": theirs.seconds / p.seconds,
                     "speed-up (CPU)": theirs.cpu_seconds / p.cpu_seconds, "peak RSS MiB": p.peak_mib})
    notes = [
        (f"workload: {cfg.task}, {len(users)} most active demo test users, methods {', '.join(cfg.methods)}, "
         f"{cfg.user_train.max_examples} items x {cfg.user_train.epochs} epochs, batch {cfg.user_train.batch_size}, "
         f"{n_queries} answers, greedy, {bench_dtype()}, no task adaptation; each engine's time includes loading "
         f"the model, training, answering and the store; a 16-bit model's CPU training passes hold at most "
         f"{oppu.train.TOKENS_PER_FORWARD_16BIT} padded tokens"),
        (f"multi_lora vs per_user: {speedup:.2f}x wall, {theirs.cpu_seconds / ours.cpu_seconds:.2f}x CPU, training "
         f"{their_clock.train_s / max(our_clock.train_s, 1e-9):.2f}x, answering "
         f"{their_clock.rest_s / max(our_clock.rest_s, 1e-9):.2f}x: " + verdict(speedup, TARGET_SPEEDUP)),
        f"answers shared by the two engines: {same}/{len(their_answers)}",
        f"each engine ran {args.rounds} time(s), order alternating; the fastest is reported",
    ]
    if args.fp32_baseline:
        from oppu.model import compute_dtype_name

        resolved = compute_dtype_name(cfg.model, MODEL_CACHE)
        default_speedup = best[FP32].seconds / ours.seconds
        notes.append(f"default run ({bench_dtype()}, computing in {resolved}) vs the same run in float32: "
                     f"{default_speedup:.2f}x wall, {best[FP32].cpu_seconds / ours.cpu_seconds:.2f}x CPU (the "
                     "precision policy's share; the default run's target is bench.versus's)")
    append_report(f"Engines: multi_lora vs per_user on one {len(users)}-user run", markdown_table(rows), notes,
                  write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
