"""`oppu prepare`: convert the embedded SmolLM2 GGUF once into its safetensors cache, measure what `dtype=auto`
computes in on this CPU (`oppu.precision`, cached beside the model), time a reload, and build the task-adapted
bases of the dashboard's quick demo (the `quick` preset on the default task), so that its first click only trains
the two personal adapters."""

from __future__ import annotations

import argparse
import os
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default=".cache/models", help="model cache folder (default .cache/models)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the cache and measure the precision probe again even when they exist")
    parser.add_argument("--no-demo-base", action="store_true",
                        help="skip building the quick demo's task-adapted bases (built on its first run instead)")
    parser.add_argument("--data", default="data/demo", help="data folder of the quick demo (default data/demo)")
    parser.add_argument("--artifacts", default="runs/artifacts",
                        help="where the quick demo's task-adapted bases are cached (default runs/artifacts, the "
                             "dashboard's)")


def run(args: argparse.Namespace) -> int:
    from oppu.commands.run import fail
    from oppu.config import ModelConfig
    from oppu.model import ModelLoadError, embedded_cache_dir, load_model, prepare_embedded_model
    from oppu.precision import AUTO_DTYPE_ENV, probe_and_cache, verdict_path

    existed = embedded_cache_dir(args.cache).is_dir() and not args.force
    started = time.perf_counter()
    try:
        folder = prepare_embedded_model(args.cache, force=args.force)
    except ModelLoadError as exc:
        return fail("prepare", exc)
    built_s = time.perf_counter() - started
    verdict = probe_and_cache(args.cache, force=args.force)
    started = time.perf_counter()
    load_model(ModelConfig(device="cpu"), args.cache)
    load_s = time.perf_counter() - started
    what = "cache already present" if existed else f"converted in {built_s:.1f} s"
    print(f"embedded model: {folder} ({what}); loads in {load_s:.1f} s")
    print(f"dtype auto on this CPU: {verdict['dtype']} (bf16 {verdict['speedup']:.2f}x fp32 on the probe, "
          f"{verdict['min_speedup']:g}x needed; {verdict['cpu']}; cached in {verdict_path(args.cache)})"
          + (f"; overridden by {AUTO_DTYPE_ENV}={os.environ[AUTO_DTYPE_ENV]}" if os.environ.get(AUTO_DTYPE_ENV) else ""))
    if not args.no_demo_base:
        return _demo_bases(args)
    return 0


def _demo_bases(args: argparse.Namespace) -> int:
    from oppu.commands.run import fail, usage_errors
    from oppu.config import RunConfig, build_config
    from oppu.experiment import prepare_bases

    cfg = build_config("quick", {"task": RunConfig().task, "data_dir": args.data, "artifacts_dir": args.artifacts})
    started = time.perf_counter()
    try:
        results = prepare_bases(cfg)
    except usage_errors() as exc:
        return fail("prepare", exc)
    cached = sum(r.cached for r in results.values())
    print(f"quick demo ({cfg.task}): {len(results)} task-adapted base(s) in {args.artifacts}, {cached} already "
          f"cached, {time.perf_counter() - started:.1f} s")
    return 0
