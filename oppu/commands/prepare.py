"""`oppu prepare`: convert the embedded SmolLM2 GGUF once into its safetensors cache and time a reload."""

from __future__ import annotations

import argparse
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default=".cache/models", help="model cache folder (default .cache/models)")
    parser.add_argument("--force", action="store_true", help="rebuild the cache even when it exists")


def run(args: argparse.Namespace) -> int:
    from oppu.commands.run import fail
    from oppu.config import ModelConfig
    from oppu.model import ModelLoadError, embedded_cache_dir, load_model, prepare_embedded_model

    existed = embedded_cache_dir(args.cache).is_dir() and not args.force
    started = time.perf_counter()
    try:
        folder = prepare_embedded_model(args.cache, force=args.force)
    except ModelLoadError as exc:
        return fail("prepare", exc)
    built_s = time.perf_counter() - started
    started = time.perf_counter()
    load_model(ModelConfig(device="cpu"), args.cache)
    load_s = time.perf_counter() - started
    what = "cache already present" if existed else f"converted in {built_s:.1f} s"
    print(f"embedded model: {folder} ({what}); loads in {load_s:.1f} s")
    return 0
