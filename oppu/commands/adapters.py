"""`oppu adapters list|export|delete|import|update`: a user's personal adapters on disk (core: `oppu.adapters`)."""

from __future__ import annotations

import argparse
import zipfile

from oppu.adapters import UserAdapters, adapters_root, delete, export_zip, find, import_zip, update


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", default="runs/artifacts", help="artifacts folder (default runs/artifacts)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="every stored personal adapter")
    export = sub.add_parser("export", help="zip one user's adapters of one run, loadable anywhere with "
                                           "transformers + peft (task LoRA, base name, README, load.py inside)")
    export.add_argument("user")
    export.add_argument("--out", required=True, help="zip file to write")
    export.add_argument("--run", help="run id (default: the user's newest run)")
    delete = sub.add_parser("delete", help="delete a user's adapters (of one run, or all runs)")
    delete.add_argument("user")
    delete.add_argument("--run", help="only this run id")
    imp = sub.add_parser("import", help="unpack an exported zip into the artifacts folder")
    imp.add_argument("zip")
    upd = sub.add_parser("update", help="continue training a user's adapters on new history items only")
    upd.add_argument("user")
    upd.add_argument("--items", required=True, help="JSON list of new history items (the task's profile format)")
    upd.add_argument("--run", help="run id (default: the user's newest run)")
    upd.add_argument("--model", help="the base model, when the run trained on a local folder")
    upd.add_argument("--epochs", type=int, help="epochs over the new items (default: the run's per-user epochs)")
    upd.add_argument("--device", default="auto", help="auto, cpu or cuda")


def _pick(args: argparse.Namespace) -> list[UserAdapters]:
    entries = find(args.artifacts, args.user)
    if args.run:
        entries = [e for e in entries if e.run_id == args.run]
    if not entries:
        where = f" in run {args.run}" if args.run else ""
        raise ValueError(f"no adapters for user {args.user!r}{where} under {adapters_root(args.artifacts)}: "
                         "see `oppu adapters list`")
    return entries


def run(args: argparse.Namespace) -> int:
    from oppu.commands.run import fail

    try:
        if args.action == "list":
            entries = find(args.artifacts)
            if not entries:
                print(f"no adapters under {adapters_root(args.artifacts)}")
            for e in entries:
                print(f"{e.user_id}\t{e.task}\t{e.run_id}\t{','.join(e.styles)}\t{e.created}\t{e.folder}")
        elif args.action == "export":
            entry = _pick(args)[0]
            print(f"wrote {export_zip(entry, args.out, args.artifacts)} (user {entry.user_id}, run {entry.run_id}, "
                  f"{', '.join(entry.styles)})")
        elif args.action == "delete":
            for entry in _pick(args):
                print(f"deleted {delete(entry)}")
        elif args.action == "update":
            result = update(_pick(args)[0], args.items, model=args.model, epochs=args.epochs, device=args.device)
            for problem in result.problems:
                print(f"skipped item: {problem}")
            for style, step in result.updated.items():
                print(f"updated {result.folder / style}: +{len(step['items_added'])} items, {step['steps']} steps, "
                      f"final loss {step['final_loss']}")
            for style, why in result.skipped.items():
                print(f"left {result.folder / style} as it was: {why}")
        else:
            print(f"imported into {import_zip(args.zip, args.artifacts)}")
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        return fail(f"adapters {args.action}", exc)
    return 0
