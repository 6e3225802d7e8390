"""`oppu prepare`: convert the embedded SmolLM2 GGUF once into its safetensors cache, measure what `dtype=auto`
computes in on this CPU (`oppu.precision`, cached beside the model) and time a reload."""

from __future__ import annotations

import argparse
import os
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default=".cache/models", help="model cache folder (default .cache/models)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the cache and measure the precision probe again even when they exist")


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
    return 0
