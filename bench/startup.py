"""Model start: loading the embedded default from its safetensors cache against the first GGUF conversion.

Both run through `oppu.model` into a temporary cache folder (the project's own cache is left alone):
- first conversion: `prepare_embedded_model(force=True)` (dequantize the GGUF, write the cache);
- start from cache: `load_model` on that cache, in this process and in a fresh process (imports included,
  which is what a worker or the dashboard pays).

Target: start from cache <= 3 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT, append_report, markdown_table, phase, verdict

TARGET_START_S = 3.0

_FRESH = """
import time; t = time.perf_counter()
from oppu.config import ModelConfig
from oppu.model import load_model
load_model(ModelConfig(device="cpu"), {cache!r})
print(time.perf_counter() - t)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n")[0])
    parser.add_argument("--no-report", action="store_true", help="print only; do not append to the dated log in docs/bench-log/")
    args = parser.parse_args(argv)

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from oppu.config import ModelConfig
    from oppu.model import load_model, prepare_embedded_model

    with tempfile.TemporaryDirectory(prefix="oppu-bench-cache-") as cache:
        with phase("first conversion") as convert:
            prepare_embedded_model(cache, force=True)
        loads = []
        for i in range(2):
            with phase(f"load from cache #{i + 1}") as p:
                model, _ = load_model(ModelConfig(device="cpu"), cache)
            loads.append(p)
            del model
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _FRESH.format(cache=cache)], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        fresh_total = time.perf_counter() - started
        fresh_load = float(out.stdout.strip().splitlines()[-1])
    best = min(loads, key=lambda p: p.seconds)
    rows = [{"path": "first conversion (GGUF -> safetensors cache)", "wall s": convert.seconds,
             "CPU s": convert.cpu_seconds, "peak RSS MiB": convert.peak_mib},
            {"path": "start from cache (load_model, in process)", "wall s": best.seconds, "CPU s": best.cpu_seconds,
             "peak RSS MiB": best.peak_mib},
            {"path": "start from cache (fresh process: imports + load_model)", "wall s": fresh_load},
            {"path": "fresh process, interpreter start to exit", "wall s": fresh_total}]
    notes = [f"start from cache: {best.seconds:.2f} s in process ({convert.seconds / best.seconds:.0f}x faster "
             f"than converting), {fresh_load:.2f} s in a fresh process with imports: "
             + verdict(fresh_load, TARGET_START_S, higher_is_better=False),
             "in-process loads: " + ", ".join(f"{p.seconds:.2f} s" for p in loads)]
    append_report("Model start: cache against first conversion", markdown_table(rows), notes,
                  write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
