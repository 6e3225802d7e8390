"""`oppu tune --grid KEY=V1,V2 ... --out tuned.json`: choose settings on the validation split, write a preset.

Every grid point runs like `oppu run --split validation` (same flags, `--preset` included); the table of points and
the choice are printed, and the preset file is what `oppu run --preset tuned.json` (or `oppu report`) takes.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from oppu.commands.run import (
    ProgressBar,
    add_run_arguments,
    config_from_args,
    fail,
    typed_command,
    usage_errors,
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                        help="a config key (dotted, e.g. user_train.lr) and its candidate values; repeat the flag "
                             "for a grid over several keys")
    parser.add_argument("--out", required=True, help="where to write the tuned preset (.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from oppu.store import Store
    from oppu.tuning import parse_grid, tune

    out = Path(args.out)
    if out.suffix != ".json":
        return fail("tune", ValueError(f"--out {args.out!r} must end in .json (it is read back as a preset)"))
    try:
        grid = parse_grid(args.grid)
        base = config_from_args(args)
    except ValueError as exc:
        return fail("tune", exc)
    command = typed_command("tune", "oppu tune " + " ".join(f"--grid {shlex.quote(g)}" for g in args.grid))
    bar = ProgressBar(not args.quiet)

    def show(point) -> None:
        values = ", ".join(f"{k}={v}" for k, v in point.values.items())
        print(f"  {values}: {point.score:.4f} over {point.queries} validation answers (run {point.run_id})",
              flush=True)

    try:
        preset = tune(base, grid, Store(base.db), base_preset=args.preset, command=command, progress=bar,
                      on_point=show)
    except usage_errors() as exc:
        return fail("tune", exc)
    finally:
        bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(preset, indent=1) + "\n")
    chosen = preset["_chosen_on"]
    print(f"chosen on the validation split of {chosen['task']} ({len(chosen['users'])} users, "
          f"{chosen['validation_items']} held-out items each; {chosen['objective']}): "
          + ", ".join(f"{k}={v}" for k, v in chosen["chosen"].items()))
    print(f"wrote {out}: use it with `oppu run --preset {out}`")
    return 0
