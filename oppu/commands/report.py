"""`oppu report --preset tiny|demo|paper --out report.html`: the main table and the paper's analyses run into the
results store and written as one self-contained HTML file (`oppu.report`), with a progress bar and the time left.

`--dry-run` prints the runs the preset plans and stops. Flags point the runs at a model, data, store and artifact
folder like `oppu run`'s.
"""

from __future__ import annotations

import argparse
import shlex


def configure(parser: argparse.ArgumentParser) -> None:
    from oppu.report import REPORT_PRESETS

    parser.add_argument("--preset", default="demo", choices=list(REPORT_PRESETS),
                        help="report size: " + "; ".join(f"{n}: {p.about}" for n, p in REPORT_PRESETS.items()))
    parser.add_argument("--out", default="report.html", help="the HTML file to write (default report.html)")
    parser.add_argument("--markdown", help="also write the findings, tables and provenance as Markdown to this file "
                                           "(docs/RESULTS.md is made this way)")
    parser.add_argument("--model", help="embedded:SmolLM2-135M-Instruct (default), a hub id or a local folder")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--data", help="data folder holding <task id>/ (default data/demo)")
    parser.add_argument("--db", help="results store (default runs/oppu.duckdb)")
    parser.add_argument("--artifacts", help="adapters and caches (default runs/artifacts)")
    parser.add_argument("--seeds", help="comma list replacing the preset's seeds (e.g. 0 for one seed)")
    parser.add_argument("--run-preset", help="the run preset under every run instead of the report preset's: a "
                                             "name in oppu/presets or a preset file written by oppu tune")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and stop")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (one line per run instead)")


def overrides_from_args(args: argparse.Namespace) -> dict:
    flags = {"model.name": args.model, "model.device": args.device, "model.dtype": args.dtype,
             "data_dir": args.data, "db": args.db, "artifacts_dir": args.artifacts}
    return {k: v for k, v in flags.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from oppu.commands.run import fail, typed_command, usage_errors
    from oppu.report import ReportError, build_report, customized, estimate, get_preset, plan, users_to_run

    overrides = overrides_from_args(args)
    try:
        preset = customized(get_preset(args.preset), args.seeds or None, args.run_preset)
        runs, notes = plan(preset, overrides)
    except (ReportError, ValueError) as exc:
        return fail("report", exc)
    if args.dry_run:
        print(f"report {args.preset}: {len(runs)} runs x {len(preset.seeds)} seed(s), "
              f"{users_to_run(runs, preset.seeds)} user trainings")
        for r in runs:
            print(f"  {r.section:16s} {r.task:8s} {r.label:20s} {','.join(r.cfg.methods)}  users={r.cfg.users}")
        for note in notes:
            print(f"  note: {note}")
        try:
            guess = estimate(runs, preset.seeds)
        except Exception as exc:  # noqa: BLE001 - an estimate only; the plan above stands without it
            print(f"  (no estimate: {exc})")
        else:
            units = guess["units"]
            print(f"  estimate: {units['adapt']} task-adaptation steps, {units['user']} user-training steps, "
                  f"{units['generate']} answers; about {guess['seconds'] / 60:.0f} min at the untuned default per-unit "
                  "costs of oppu.jobs.plan (a CPU step of the embedded 135M model)")
        return 0
    command = typed_command("report", "oppu report --preset " + args.preset + " --out " + shlex.quote(args.out)
                            + (" --markdown " + shlex.quote(args.markdown) if args.markdown else ""))
    try:
        path = build_report(args.preset, args.out, overrides, command=command, progress=not args.quiet,
                            seeds=preset.seeds, run_preset=args.run_preset, markdown=args.markdown)
    except (ReportError, *usage_errors()) as exc:
        return fail("report", exc)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
