"""The `oppu` command line: one table from command names to the core modules that implement them.

Only the module of the command being run is imported, so `oppu --help` and light commands start in well under a
second instead of paying for torch and transformers. Every user-facing error (`oppu.errors.OppuError`) a command
lets through is reported here, in one line on stderr with exit status 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from oppu.errors import OppuError

# command -> (module under oppu.commands, one-line help). Each module defines
# `configure(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data", "convert, validate or download LaMP data"),
    "evaluate": ("evaluate", "score predictions against golds exactly as the LaMP evaluation does"),
    "run": ("run", "run an experiment end to end and print its metric table"),
    "sweep": ("sweep", "run one of the paper's analyses (k, activity, peft, history-format, behaviour-shift)"),
    "tune": ("tune", "choose settings on a validation split of the users' history (never on test queries)"),
    "results": ("results", "print stored metrics per run and method"),
    "report": ("report", "run the main table and the paper's analyses and write one HTML report"),
    "adapters": ("adapters", "list, export, import, update or delete a user's personal adapters"),
    "jobs": ("jobs", "submit, list, show, cancel, resume training jobs or show their logs"),
    "worker": ("worker", "run one job (started by `oppu jobs submit`; not for direct use)"),
    "dashboard": ("dashboard", "start the Streamlit dashboard (binds 127.0.0.1)"),
    "prepare": ("prepare", "convert the embedded default model once into its local safetensors cache"),
    "serve": ("serve", "serve personal models over an OpenAI-compatible HTTP API (binds 127.0.0.1)"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oppu", description="OPPU Studio: One PEFT Per User on LaMP.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _top_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"oppu: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    module = importlib.import_module(f"oppu.commands.{COMMANDS[name][0]}")
    parser = argparse.ArgumentParser(prog=f"oppu {name}", description=COMMANDS[name][1])
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except OppuError as exc:
        # Bad input or an unusable environment, not a bug: one line in the words the user typed, no traceback.
        words = " ".join(["oppu", name, *([args.action] if isinstance(getattr(args, "action", None), str) else [])])
        print(f"{words}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
