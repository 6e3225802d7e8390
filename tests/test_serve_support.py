"""Shared pieces of the serving tests (no tests here): a tiny run with personal adapters on disk, and a server
on 127.0.0.1 in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from oppu.config import GenerationConfig, ModelConfig, RunConfig, TrainConfig

FAST_USER = TrainConfig(epochs=1, lr=1e-2, batch_size=4, max_length=256)
FAST_ADAPT = TrainConfig(epochs=1, lr=1e-2, batch_size=8, max_length=256, max_examples=12)
MAX_NEW = 4


def tiny_run(tiny_model_dir, tiny_data_dir, root, methods=("none", "rag", "oppu", "oppu+rag"), users=3):
    """Run a tiny experiment into `root`; returns (config, run id)."""
    import oppu.profiles
    from oppu.experiment import run_experiment

    oppu.profiles.PROFILE_MAX_NEW_TOKENS = 4
    cfg = RunConfig(task="LaMP_2M", methods=methods, users=users, data_dir=str(tiny_data_dir),
                    db=str(root / "r.duckdb"), artifacts_dir=str(root / "art"),
                    model=ModelConfig(name=str(tiny_model_dir), device="cpu"), adaptation_train=FAST_ADAPT,
                    user_train=FAST_USER, generation=GenerationConfig(max_new_tokens=MAX_NEW, batch_size=8))
    return cfg, run_experiment(cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    """Serve `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
