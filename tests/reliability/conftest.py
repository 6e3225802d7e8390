"""Helpers of the reliability suite: run the real `oppu` CLI in a subprocess, fingerprint folders, build state.

The CLI runs as `python -m oppu ...` in a child process so that what a user sees (exit status, stderr) is what
is checked: an uncaught exception shows up as a traceback on stderr there, not as a pytest error.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CliResult:
    rc: int
    stdout: str
    stderr: str

    def one_line_error(self) -> str:
        """The stderr text, after checking it is a short, traceback-free report (what every bad input gets)."""
        assert "Traceback" not in self.stderr, self.stderr
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert lines, f"no message on stderr (rc {self.rc}, stdout {self.stdout!r:.300})"
        return self.stderr


def oppu(*argv: str | os.PathLike, cwd: str | os.PathLike | None = None, env: dict | None = None,
         timeout: float = 120) -> CliResult:
    """Run `python -m oppu ARGV` from the repository root (or `cwd`) and capture its outcome."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "oppu", *map(str, argv)], check=False, cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def tree_hash(*roots: str | os.PathLike) -> dict[str, str]:
    """relative path -> sha256 of every file under `roots` (missing roots count as empty): before/after checks."""
    out: dict[str, str] = {}
    for root in map(Path, roots):
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for path in sorted(root.rglob("*")) if root.is_dir() else ():
            if path.is_file() and not path.name.endswith(".lock"):  # lock files are touched by readers
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass(frozen=True)
class State:
    """A populated product state: a results store with one finished run, an adapter folder and a jobs root."""

    root: Path
    db: Path
    artifacts: Path
    jobs: Path

    def fingerprint(self) -> dict[str, str]:
        return tree_hash(self.db, self.artifacts, self.jobs)


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> State:
    """Shared by a module's tests: each test compares fingerprints taken before and after its own call."""
    from oppu.store import Store

    root = tmp_path_factory.mktemp("state")
    db, artifacts, jobs = root / "oppu.duckdb", root / "artifacts", root / "jobs"
    store = Store(db)
    store.create_run("run-keep", {"task": "LaMP_2M", "methods": ["none"]}, task="LaMP_2M", model="m",
                     data_fingerprint="f", code_version="c")
    store.add_predictions([{"run_id": "run-keep", "task": "LaMP_2M", "user_id": "u", "query_id": "q",
                            "method": "none", "k": 0, "peft": "", "retriever": "", "prompt": "p",
                            "raw_output": "comedy", "output": "comedy", "gold": "comedy", "retrieved_ids": [],
                            "retrieved_scores": [], "history_size": 1}])
    store.finish_run("run-keep", {"none": {"accuracy": 1.0}})
    adapter = artifacts / "adapters" / "LaMP_2M" / "run-keep" / "u" / "plain"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (adapter / "manifest.json").write_text('{"user_id": "u"}')
    jobs.mkdir()
    return State(root, db, artifacts, jobs)


HOSTILE_USERS = ("../../etc/passwd", "/etc/cron.d/oppu", "a\0b", "a/b", "..", ".hidden", "~root", "C:\\x")
"""User ids that must never become paths outside the project's folders (NUL included: JSON allows it)."""
SECRET = "s3cr3t-token-4f9a"
"""An environment value that must never be stored in a config, manifest or exported zip."""


@dataclass(frozen=True)
class HostileRun:
    base: Path
    """Everything the run could touch lives below it (the data, store and artifacts sit three folders deep)."""
    home: Path
    cfg: object
    run_id: str
    before: frozenset
    after: frozenset


def _hostile_user(uid: str, offset: int):
    from oppu.data import Item, Query, User
    from oppu.tasks import get_task

    task = get_task("LaMP_2M")
    tags = ("comedy", "action", "romance")
    history = tuple(Item(f"{uid}#{i}", {"description": f"film {i} about ships and space {offset}",
                                        "tag": tags[(i + offset) % 3]}, f"2020-01-0{i + 1}") for i in range(3))
    return User(uid, history, (Query(f"q-{offset}", task.make_input(f"film about space {offset}"), "comedy",
                                     "2021-01-01"),))


@pytest.fixture(scope="session")
def hostile_run(tmp_path_factory, tiny_model_dir) -> HostileRun:
    """One real `run_experiment` on the tiny model whose test users have hostile ids, with absolute paths under a
    fake home folder and a secret in the environment (the exposure checks read what it stored)."""
    from oppu.config import GenerationConfig, ModelConfig, RunConfig, TrainConfig
    from oppu.data import write_oppu
    from oppu.experiment import run_experiment

    base = tmp_path_factory.mktemp("hostile")
    home = base / "home" / "alice"
    project = home / "work" / "project" / "deep"
    users = [_hostile_user(uid, i) for i, uid in enumerate(HOSTILE_USERS)]
    write_oppu("LaMP_2M", [_hostile_user("other", 9)], users, project / "data")
    cfg = RunConfig(task="LaMP_2M", methods=("none", "rag", "oppu"), user_ids=HOSTILE_USERS,
                    data_dir=str(project / "data"), db=str(project / "runs" / "oppu.duckdb"),
                    artifacts_dir=str(project / "runs" / "artifacts"),
                    model=ModelConfig(name=str(tiny_model_dir), device="cpu"), task_adaptation=False,
                    user_train=TrainConfig(epochs=1, lr=1e-2, batch_size=4, max_length=96),
                    generation=GenerationConfig(max_new_tokens=2, batch_size=16))
    before = frozenset(p for p in base.rglob("*"))
    saved = {k: os.environ.get(k) for k in ("HOME", "OPPU_TEST_SECRET")}
    os.environ.update(HOME=str(home), OPPU_TEST_SECRET=SECRET)
    try:
        run_id = run_experiment(cfg)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return HostileRun(base, home, cfg, run_id, before, frozenset(p for p in base.rglob("*")))
