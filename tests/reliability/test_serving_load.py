"""`oppu serve` as a real process on 127.0.0.1 over a tiny run's adapters:

- under load: concurrent clients (half streaming) for a fixed time get no 5xx, no failed request, every answer
  equal to the single-user greedy reference of its own model and prompt (no cross-user answer), and the server's
  RSS stays flat after warm-up. The driver is `bench.serving_soak` (its script runs 32 clients x 2 minutes on the
  real model); here 8 clients for `OPPU_SOAK_SECONDS` (default 15 s) on the tiny model;
- killed with SIGKILL in the middle of a streamed answer: no adapter folder changes by a byte, and a restarted
  server gives the same answers as before.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
from pathlib import Path

import pytest
from test_serve_support import tiny_run

from bench.serving_soak import chat, distinguishing, references, run_load, start_server, stop_server

from .conftest import tree_hash

CLIENTS = 8
SECONDS = float(os.environ.get("OPPU_SOAK_SECONDS", "15"))
MAX_TOKENS = 8
PROMPTS = ("Which tag does this movie relate to? space ship love city dragon war",
           "Which tag does this movie relate to? old film hero night river laugh",
           "Which tag does this movie relate to? laugh old film hero space ship",
           "Which tag does this movie relate to? river dragon night war love city")


@pytest.fixture(scope="module")
def run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-load")
    cfg, run_id = tiny_run(tiny_model_dir, tiny_data_dir, root, methods=("none", "oppu", "oppu+rag"))
    return cfg, run_id


def serve_args(run, tiny_model_dir) -> list[str]:
    cfg, _ = run
    return ["--artifacts", cfg.artifacts_dir, "--model", str(tiny_model_dir), "--device", "cpu", "--dtype",
            "float32"]


def models_of(run_id) -> list[str]:
    return [*(f"{run_id}/{u}{s}" for u in ("alice", "bob", "carol") for s in ("", "@rag")), "LaMP_2M", "base"]


@pytest.mark.slow  # a server start, the references and the load: ~30 s
def test_many_clients_get_their_own_answers_without_5xx_or_memory_growth(run, tiny_model_dir):
    _, run_id = run
    proc, url = start_server(serve_args(run, tiny_model_dir))
    try:
        refs = references(url, [(m, p) for m in models_of(run_id) for p in PROMPTS], MAX_TOKENS)
        assert distinguishing(refs) == 1.0, "the models must answer differently for a mix-up to show"
        result = run_load(url, proc.pid, refs, CLIENTS, SECONDS, MAX_TOKENS)
        assert proc.poll() is None, "the server died under load"
    finally:
        stop_server(proc)
    assert not result.problems(), (result.problems(), result.summary())
    assert result.requests >= CLIENTS * 2, result.summary()


def _stream_until_first_token(url: str, model: str, prompt: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 400, "temperature": 0,
        "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
            return conn  # a token is out: the answer is mid-stream
    raise AssertionError("the stream ended before its first token")


def test_kill_9_mid_stream_loses_no_adapter_and_answers_the_same_after_restart(run, tiny_model_dir):
    cfg, run_id = run
    adapters = Path(cfg.artifacts_dir)
    before = tree_hash(adapters)
    jobs = [(m, p) for m in models_of(run_id) for p in PROMPTS[:2]]
    proc, url = start_server(serve_args(run, tiny_model_dir))
    try:
        answers = references(url, jobs, MAX_TOKENS)
        conn = _stream_until_first_token(url, f"{run_id}/alice@rag", PROMPTS[0])
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        conn.close()
    finally:
        stop_server(proc)
    assert tree_hash(adapters) == before, "an adapter file changed, appeared or vanished"
    proc, url = start_server(serve_args(run, tiny_model_dir))
    try:
        assert references(url, jobs, MAX_TOKENS) == answers
        status, _ = chat(url, f"{run_id}/alice@rag", PROMPTS[0], MAX_TOKENS, stream=True)
        assert status == 200
    finally:
        stop_server(proc)
    assert tree_hash(adapters) == before
