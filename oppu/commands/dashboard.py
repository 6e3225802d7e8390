"""`oppu dashboard`: start the Streamlit dashboard, bound to 127.0.0.1 unless told otherwise.

It runs `streamlit run dashboard/app.py` headless, with usage statistics off, from the repository root (where
`.streamlit/config.toml` lives) and hands the data, store, jobs and artifact locations to the app through the
`OPPU_*` environment variables that the dashboard reads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: only this machine; 0.0.0.0 exposes it to the "
                             "network, and the dashboard can start jobs and delete adapters)")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--data", default=None, help="data folder (default $OPPU_DATA or data/demo)")
    parser.add_argument("--db", default=None, help="results store (default $OPPU_DB or runs/oppu.duckdb)")
    parser.add_argument("--jobs", default=None, help="jobs folder (default $OPPU_JOBS or runs/jobs)")
    parser.add_argument("--artifacts", default=None,
                        help="adapters and caches (default $OPPU_ARTIFACTS or runs/artifacts)")


def app_path() -> Path:
    """dashboard/app.py of this checkout: beside the `oppu` package (found from here, not from the caller's
    working folder, where another `dashboard` folder could shadow ours)."""
    app = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
    if not app.is_file():
        raise ValueError(f"{app} is missing: run `oppu dashboard` from a checkout of OPPU Studio "
                         "(`pip install -e .`), which carries the dashboard/ and pages/ folders")
    return app


def streamlit_command(args: argparse.Namespace, environ: dict[str, str]) -> tuple[list[str], dict[str, str], Path]:
    """(argv, environment, working folder) that start the dashboard for these arguments."""
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: use a TCP port between 1 and 65535")
    app = app_path()
    root = app.parent.parent
    env = dict(environ)
    for name, value in (("OPPU_DATA", args.data), ("OPPU_DB", args.db), ("OPPU_JOBS", args.jobs),
                        ("OPPU_ARTIFACTS", args.artifacts)):
        if value is not None:
            # absolute, because relative paths would be read from the app's working folder, not the caller's
            env[name] = str(Path(value).resolve())
    argv = [sys.executable, "-m", "streamlit", "run", str(app),
            "--server.address", args.host, "--server.port", str(args.port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    return argv, env, root


def run(args: argparse.Namespace) -> int:
    try:
        argv, env, root = streamlit_command(args, dict(os.environ))
    except ValueError as exc:
        print(f"oppu dashboard: {exc}", file=sys.stderr)
        return 2
    print(f"OPPU Studio dashboard: http://{args.host}:{args.port}  (Ctrl+C stops it)", flush=True)
    try:
        return subprocess.call(argv, env=env, cwd=root)
    except KeyboardInterrupt:
        return 0
