"""`oppu data convert|validate|download`: official LaMP files -> OPPU layout, data checks, downloads."""

from __future__ import annotations

import argparse
import sys

from oppu.tasks import TASKS

SHOWN_PROBLEMS = 20


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    convert = sub.add_parser("convert", help="official LaMP questions/outputs -> OPPU per-user layout")
    convert.add_argument("--task", required=True, choices=list(TASKS))
    convert.add_argument("--questions", required=True, help="a LaMP *_questions.json file")
    convert.add_argument("--outputs", help="the matching *_outputs.json (omit for an unlabelled split)")
    convert.add_argument("--out", required=True, help="data folder; the task folder DIR/<task id>/ is written")
    convert.add_argument("--test-users", type=int, default=100, help="most active users kept as test users")
    validate = sub.add_parser("validate", help="list every problem of a data folder or file (exit 1 if any)")
    validate.add_argument("path", help="a task folder, a data folder of task folders, or one JSON file")
    validate.add_argument("--task", choices=list(TASKS), help="the task (guessed from the path when omitted)")
    download = sub.add_parser("download", help="download a task's official train/dev files (needs internet)")
    download.add_argument("--task", required=True, choices=list(TASKS))
    download.add_argument("--out", required=True, help="folder; files go to OUT/<task id>/")
    download.add_argument("--base-url", default=None, help="mirror of https://ciir.cs.umass.edu/downloads/LaMP/")


def _convert(args: argparse.Namespace) -> int:
    from oppu.lamp_import import convert_lamp

    data = convert_lamp(args.task, args.questions, args.outputs, args.out, test_users=args.test_users)
    queries = sum(len(u.queries) for u in (*data.train_users, *data.test_users))
    print(f"wrote {data.source}: {len(data.test_users)} test users, {len(data.train_users)} other users, "
          f"{queries} queries, {len(data.problems)} problem(s), {data.leaks_dropped} leaking history item(s) "
          "dropped")
    if data.leaks_dropped:
        print(f"warning: dropped {data.leaks_dropped} history item(s) that repeat one of their user's queries "
              "(its own document, or a generation gold); training and retrieval on them would see the golds",
              file=sys.stderr)
    for problem in data.problems[:SHOWN_PROBLEMS]:
        print(f"warning: {problem}", file=sys.stderr)
    if len(data.problems) > SHOWN_PROBLEMS:
        print(f"warning: ... {len(data.problems) - SHOWN_PROBLEMS} more; see `oppu data validate {data.source}`",
              file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from oppu.lamp_import import validate_path

    problems = validate_path(args.path, args.task)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: no problems in {args.path}")
    return 1 if problems else 0


def _download(args: argparse.Namespace) -> int:
    from oppu.lamp_import import LAMP_BASE_URL, download_lamp

    for path in download_lamp(args.task, args.out, args.base_url or LAMP_BASE_URL):
        print(path)
    return 0


_ACTIONS = {"convert": _convert, "validate": _validate, "download": _download}


def run(args: argparse.Namespace) -> int:
    """Unusable data (DataError) is reported by the CLI entry point; a failing disk is reported here."""
    try:
        return _ACTIONS[args.action](args)
    except OSError as exc:
        print(f"oppu data {args.action}: error: {exc}", file=sys.stderr)
        return 1
