"""Serving many users at once: `oppu serve` (continuous batching over gathered multi-LoRA, over HTTP) against a
baseline that serves the same requests one at a time through PEFT, switching adapters per request.

Workload: N concurrent clients (N = 1, 8, 32 by default), each a different user with its own LoRA (r=8 on
q_proj/v_proj, random non-zero weights, written as real adapter folders the server finds on disk), each sending
`--requests` chat requests of the demo LaMP_7 (the OPPU prompt of one of its queries), greedy, `--max-tokens` new
tokens. Both paths get the same prompts and budgets and start with every adapter on disk:

- baseline: one worker thread owning a `PeftModel` with every user's adapter loaded; each request activates
  its user's adapter and runs `generate` alone (no HTTP: this favours the baseline);
- server: the FastAPI app of `oppu serve` on 127.0.0.1 (uvicorn in a thread), clients POST
  `/v1/chat/completions` concurrently.

Reported per N: requests/s, generated tokens/s, p50/p95 latency (submission to last token), the server's ratios
against the baseline measured in the same run, and how many answers are identical.
"""

from __future__ import annotations

import argparse
import json
import queue
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import (
    add_device_argument,
    append_report,
    apply_device_argument,
    demo_users,
    load_default_model,
    markdown_table,
    random_lora_state,
)

TASK = "LaMP_7"
RUN_ID = "bench-serving"


def write_adapters(artifacts: Path, model, model_name: str, n_users: int) -> list[str]:
    """`n_users` personal adapter folders in the layout `oppu run` writes; returns their user ids."""
    import peft
    from safetensors.torch import save_file

    from oppu.config import ModelConfig, RunConfig
    from oppu.manifest import write_manifest
    from oppu.paths import user_adapter_dir

    cfg = RunConfig(task=TASK, methods=("oppu",), model=ModelConfig(name=model_name), task_adaptation=False)
    users = [f"bench-user-{i:02d}" for i in range(n_users)]
    for i, user in enumerate(users):
        folder = user_adapter_dir(artifacts / "adapters", TASK, RUN_ID, user) / "plain"
        folder.mkdir(parents=True)
        peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        base_model_name_or_path=model_name).save_pretrained(str(folder))
        save_file(random_lora_state(model, 8, seed=i + 1, targets=("q_proj", "v_proj")),
                  str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_manifest(folder, {"user_id": user, "run_id": RUN_ID, "task": TASK, "style": "plain",
                                "methods": ["oppu"], "config": cfg.to_dict(), "data_fingerprint": "bench",
                                "created": f"2026-01-01T00:00:{i:02d}Z"})
    return users


def prompts_for(n_users: int, per_user: int) -> list[list[str]]:
    from oppu.tasks import get_task

    task = get_task(TASK)
    out = []
    for user in demo_users(TASK, n_users):
        queries = list(user.queries) or [None]
        out.append([task.prompt(queries[j % len(queries)].input) for j in range(per_user)])
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_clients(jobs: list[list[tuple[str, str]]], send) -> tuple[float, list[float], list[tuple[str, int]]]:
    """Each client (a thread) sends its jobs in order; returns wall time, latencies, (text, tokens) per job."""
    results: dict[tuple[int, int], tuple[str, int]] = {}
    latencies: list[float] = []
    barrier = threading.Barrier(len(jobs) + 1)

    def client(c: int) -> None:
        barrier.wait()
        for j, (model, prompt) in enumerate(jobs[c]):
            start = time.perf_counter()
            results[(c, j)] = send(model, prompt)
            latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(jobs))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return wall, latencies, [results[k] for k in sorted(results)]


class PeftBaseline:
    """One request at a time through PEFT: activate the user's adapter, generate, next request."""

    def __init__(self, model, tokenizer, artifacts: Path, users: list[str], max_tokens: int):
        import peft

        from oppu.generate import encode_prompt
        from oppu.model import eos_token_ids
        from oppu.paths import user_adapter_dir

        self.tokenizer, self.max_tokens, self.encode = tokenizer, max_tokens, encode_prompt
        self.eos = eos_token_ids(tokenizer, model)
        folders = {u: user_adapter_dir(artifacts / "adapters", TASK, RUN_ID, u) / "plain" for u in users}
        self.model = peft.PeftModel.from_pretrained(model, str(folders[users[0]]), adapter_name=users[0].replace("-", "_"))
        for u in users[1:]:
            self.model.load_adapter(str(folders[u]), adapter_name=u.replace("-", "_"))
        self.model.eval()
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._worker, daemon=True).start()

    def _worker(self) -> None:
        import torch

        while True:
            user, prompt, box, done = self.jobs.get()
            self.model.set_adapter(user.split("/")[-1].replace("-", "_"))
            ids = torch.tensor([self.encode(self.tokenizer, prompt, 1536)], device=self.model.device)
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=self.max_tokens, eos_token_id=self.eos,
                                          pad_token_id=self.tokenizer.pad_token_id, temperature=None, top_p=None,
                                          top_k=None)
            new = out[0, ids.shape[1]:].tolist()
            new = new[:next((i for i, t in enumerate(new) if t in self.eos), len(new))]
            box.append((self.tokenizer.decode(new, skip_special_tokens=True), len(new)))
            done.set()

    def send(self, model: str, prompt: str) -> tuple[str, int]:
        box, done = [], threading.Event()
        self.jobs.put((model, prompt, box, done))
        done.wait()
        return box[0]


def http_sender(url: str, max_tokens: int):
    def send(model: str, prompt: str) -> tuple[str, int]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": 0}).encode()
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            reply = json.loads(resp.read())
        return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]
    return send


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="comma list of concurrent clients (one user each)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--no-report", action="store_true", help="print only, do not append to docs/bench-log/")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    apply_device_argument(args)
    ns = [int(n) for n in args.clients.split(",")]

    import copy
    import socket

    import uvicorn

    from oppu.config import EMBEDDED_MODEL
    from oppu.serve.app import create_app
    from oppu.serve.service import ServeConfig, Service

    model, tokenizer = load_default_model()
    prompts = prompts_for(max(ns), args.requests)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp)
        users = write_adapters(artifacts, model, EMBEDDED_MODEL, max(ns))
        baseline = PeftBaseline(copy.deepcopy(model), tokenizer, artifacts, users, args.max_tokens)
        service = Service(ServeConfig(artifacts=str(artifacts), model=EMBEDDED_MODEL, max_batch=max(ns),
                                      max_adapters=max(ns), max_new_tokens=max(args.max_tokens, 16)),
                          model=model, tokenizer=tokenizer)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                               log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        send_http = http_sender(f"http://127.0.0.1:{port}", args.max_tokens)
        warm = f"{RUN_ID}/{users[0]}"
        send_http(warm, prompts[0][0])  # first-use costs (adapter load, kernels) out of the timings
        baseline.send(warm, prompts[0][0])
        for n in ns:
            jobs = [[(f"{RUN_ID}/{users[c]}", p) for p in prompts[c]] for c in range(n)]
            measured = {}
            for name, send in (("peft one at a time", baseline.send), ("oppu serve", send_http)):
                wall, lat, out = run_clients(jobs, send)
                tokens = sum(t for _, t in out)
                measured[name] = (wall, lat, out, tokens)
            base_wall = measured["peft one at a time"][0]
            same = sum(a == b for (a, _), (b, _) in zip(measured["peft one at a time"][2], measured["oppu serve"][2],
                                                        strict=True))
            for name, (wall, lat, out, tokens) in measured.items():
                rows.append({"clients": n, "path": name, "requests": len(out), "req/s": len(out) / wall,
                             "tokens/s": tokens / wall, "p50 s": percentile(lat, 0.5), "p95 s": percentile(lat, 0.95),
                             "speed-up": base_wall / wall, "same answers": f"{same}/{len(out)}"})
        stats = service.scheduler.stats
        notes.append(f"server scheduler: {stats['steps']} decode steps, at most {stats['max_rows_seen']} rows in "
                     f"one step, {stats['adapter_loads']} adapter loads")
        notes.append("speed-up: baseline wall time / this path's wall time for the same requests; the baseline "
                     "runs in-process without HTTP")
        server.should_exit = True
        service.close()
    append_report(f"Serving: {args.requests} requests per client, {args.max_tokens} new tokens, clients {ns}",
                  markdown_table(rows), notes, write=not args.no_report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
