"""Soak test of `oppu serve`: many concurrent clients for a fixed time against a real server process on
127.0.0.1, every answer checked, the server's memory sampled.

`python -m bench.serving_soak [--clients 32] [--seconds 120] [--users 8]` writes `--users` personal adapters
(random non-zero LoRAs on the embedded default model, as `bench.serving` does), starts `python -m oppu serve` on a
free loopback port, asks every (model, prompt) pair once, alone, for its greedy reference answer, then lets
`--clients` threads send chat requests (half streamed) for `--seconds` seconds and checks:

- no 5xx and no failed request;
- no cross-user answer: every answer equals the single-user reference of its own model and prompt (the
  references are checked to tell the models apart, so a mix-up would show);
- memory flat after warm-up: the server's RSS (sampled from /proc every half second) grows by less than
  `MAX_GROWTH_MB` between the end of the warm-up and the end of the run.

In bfloat16 (`--dtype auto` on a CPU with AMX) a row's logits depend on the rows it is batched with, so some greedy
answers drift from their single-row reference without any mix-up; `--dtype float32` makes the check exact.
The load stops by itself at the deadline (each request also has a timeout). `tests/reliability/test_serving_load.py`
runs the same driver for a few seconds on the tiny test model.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_GROWTH_MB = 64.0
"""Allowed RSS growth after warm-up (allocator noise; a leak of one KV cache per request exceeds it quickly)."""
WARMUP_FRACTION = 0.3


# -- the server --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], env: dict | None = None, log=None) -> tuple[subprocess.Popen, str]:
    """`python -m oppu serve ARGS --port <free>` in a child process; returns (process, base URL) once /health
    answers (the process is killed if it does not within 120 s)."""
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "oppu", "serve", *args, "--port", str(port)], cwd=ROOT,
                            env=full_env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"oppu serve exited with {proc.returncode} before answering")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            if resp.status == 200:
                return proc, url
        time.sleep(0.2)
    proc.kill()
    proc.wait(10)
    raise TimeoutError("oppu serve did not answer /health within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- one request -------------------------------------------------------------------------------------------------


def chat(url: str, model: str, prompt: str, max_tokens: int, stream: bool = False,
         timeout: float = 60) -> tuple[int, str]:
    """(HTTP status, answer text) of one greedy chat completion; a streamed answer is read to its end."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream})
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return resp.status, ""
        if not stream:
            return 200, json.loads(resp.read())["choices"][0]["message"]["content"]
        text = []
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return 500, ""
            text += [c["delta"].get("content") or "" for c in event.get("choices", [])]
        return 200, "".join(text)
    finally:
        conn.close()


def references(url: str, jobs: list[tuple[str, str]], max_tokens: int) -> dict[tuple[str, str], str]:
    """Each (model, prompt) answered alone, one request at a time: what a single user gets."""
    out = {}
    for model, prompt in jobs:
        status, text = chat(url, model, prompt, max_tokens)
        if status != 200:
            raise RuntimeError(f"reference request for {model} failed with {status}")
        out[(model, prompt)] = text
    return out


def distinguishing(refs: dict[tuple[str, str], str]) -> float:
    """Share of prompts on which the models' reference answers are not all equal (a mix-up would show there)."""
    by_prompt: dict[str, set[str]] = {}
    for (_, prompt), text in refs.items():
        by_prompt.setdefault(prompt, set()).add(text)
    return sum(len(texts) > 1 for texts in by_prompt.values()) / max(1, len(by_prompt))


# -- the load ----------------------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    clients: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)
    wrong: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(model, prompt, expected, got) of every answer that is not its own reference."""
    cross_user: int = 0
    """Of `wrong`, the answers equal to another model's reference for the same prompt (and not to their own)."""
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the start, bytes) of the server process."""

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def rss_after_warmup(self) -> tuple[float, float, float]:
        """RSS in MB: median of the samples just after warm-up, median of the last 15%, their difference."""
        cut = self.seconds * WARMUP_FRACTION
        early = [b for t, b in self.rss if cut <= t < cut + self.seconds * 0.15] or [self.rss[0][1]]
        late = [b for t, b in self.rss if t >= self.seconds * 0.85] or [self.rss[-1][1]]
        start, end = statistics.median(early) / 2**20, statistics.median(late) / 2**20
        return start, end, end - start

    def rss_trajectory(self, points: int = 10) -> list[int]:
        """RSS in MB at `points` evenly spaced moments of the run (is it still growing or has it settled?)."""
        if not self.rss:
            return []
        return [round(min(self.rss, key=lambda s: abs(s[0] - self.seconds * (i + 1) / points))[1] / 2**20)
                for i in range(points)]

    def problems(self) -> list[str]:
        out = []
        if self.server_errors or set(self.statuses) - {200}:
            out.append(f"non-200 answers: {dict(self.statuses)}")
        if self.failures:
            out.append(f"{len(self.failures)} failed requests, first: {self.failures[0]}")
        if self.wrong:
            out.append(f"{len(self.wrong)} answers differ from their own model's reference, first: {self.wrong[0]}")
        if self.rss and self.rss_after_warmup()[2] > MAX_GROWTH_MB:
            start, end, growth = self.rss_after_warmup()
            out.append(f"server RSS grew {growth:.0f} MB after warm-up ({start:.0f} -> {end:.0f} MB)")
        if not self.requests:
            out.append("no request was answered")
        return out

    def summary(self) -> dict[str, object]:
        start, end, growth = self.rss_after_warmup() if self.rss else (0.0, 0.0, 0.0)
        lat = sorted(self.latencies) or [0.0]
        return {"clients": self.clients, "seconds": round(self.seconds), "requests": self.requests,
                "req/s": round(self.requests / self.seconds, 2),
                "5xx": self.server_errors, "other non-200": sum(n for s, n in self.statuses.items() if s != 200)
                - self.server_errors, "failed": len(self.failures), "not own reference": len(self.wrong),
                "of which another model's": self.cross_user,
                "p50 s": round(lat[len(lat) // 2], 3), "p95 s": round(lat[int(0.95 * (len(lat) - 1))], 3),
                "RSS after warm-up MB": round(start), "RSS at end MB": round(end), "growth MB": round(growth, 1)}


def run_load(url: str, pid: int, refs: dict[tuple[str, str], str], clients: int, seconds: float,
             max_tokens: int, seed: int = 0) -> SoakResult:
    """`clients` threads send random (model, prompt) pairs of `refs` until `seconds` have passed; every other
    request streams. Returns what happened; nothing is raised for a bad answer."""
    result = SoakResult(clients, seconds)
    lock = threading.Lock()
    jobs = sorted(refs)
    start = time.monotonic()
    deadline = start + seconds

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        n = 0
        while time.monotonic() < deadline:
            model, prompt = rng.choice(jobs)
            began = time.monotonic()
            try:
                status, text = chat(url, model, prompt, max_tokens, stream=n % 2 == 1,
                                    timeout=max(10.0, seconds))
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the load
                with lock:
                    result.failures.append(f"{type(exc).__name__}: {exc}")
                n += 1
                continue
            with lock:
                result.statuses[status] += 1
                result.latencies.append(time.monotonic() - began)
                if status == 200 and text != refs[(model, prompt)]:
                    result.wrong.append((model, prompt, refs[(model, prompt)], text))
                    result.cross_user += any(text == answer for (m, p), answer in refs.items()
                                             if p == prompt and m != model)
            n += 1

    def sample() -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                result.rss.append((time.monotonic() - start, rss_bytes(pid)))
            time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    threads.append(threading.Thread(target=sample, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return result


# -- the script --------------------------------------------------------------------------------------------------


def markdown(summary: dict[str, object]) -> str:
    keys = list(summary)
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys),
                      "| " + " | ".join(str(summary[k]) for k in keys) + " |"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving_soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--users", type=int, default=8, help="personal adapters (one model each)")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per user")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="the server's dtype (auto, float32, bfloat16)")
    parser.add_argument("--lora-scale", type=float, default=0.08,
                        help="std of the random LoRA factors: large enough that users' answers differ")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from bench.common import load_default_model, machine_info, random_lora_state
    from bench.serving import RUN_ID, TASK, prompts_for, write_adapters
    from oppu.config import EMBEDDED_MODEL
    from oppu.paths import user_adapter_dir

    model, _ = load_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        users = write_adapters(Path(tmp), model, EMBEDDED_MODEL, args.users)
        for i, user in enumerate(users):  # stronger than bench.serving's: a mix-up of users must change answers
            folder = user_adapter_dir(Path(tmp) / "adapters", TASK, RUN_ID, user) / "plain"
            save_file(random_lora_state(model, 8, seed=i + 1, targets=("q_proj", "v_proj"), scale=args.lora_scale),
                      str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        del model
        prompts = [p for per_user in prompts_for(args.users, args.prompts) for p in per_user][: args.prompts * 2]
        jobs = [(f"{RUN_ID}/{u}", p) for u in users for p in prompts]
        log = open(Path(tmp) / "serve.log", "w")  # noqa: SIM115 - closed with the folder
        proc, url = start_server(["--artifacts", tmp, "--dtype", args.dtype, "--max-batch", str(args.clients),
                                  "--max-adapters", str(args.users)], log=log)
        try:
            began = time.monotonic()
            refs = references(url, jobs, args.max_tokens)
            print(f"{len(refs)} references in {time.monotonic() - began:.0f} s; the models' answers differ on "
                  f"{distinguishing(refs):.0%} of the prompts", flush=True)
            result = run_load(url, proc.pid, refs, args.clients, args.seconds, args.max_tokens)
        finally:
            stop_server(proc)
            log.close()
    info = machine_info()
    print(f"\ncommand: python -m bench.serving_soak {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB, cuda={info['cuda']}; "
          f"{args.users} users x {len(prompts)} prompts, {args.max_tokens} new tokens, half the requests streamed\n")
    print(markdown(result.summary()))
    print(f"\nserver RSS (MB) at each tenth of the run: {result.rss_trajectory()}")
    problems = result.problems()
    print("\n" + ("\n".join(f"FAILED: {p}" for p in problems) if problems else "PASSED: no 5xx, no failed request, "
          "every answer its own model's single-user reference, memory flat after warm-up"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
