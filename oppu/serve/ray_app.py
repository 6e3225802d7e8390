"""`oppu serve --ray`: the same OpenAI-shaped app scaled out as a Ray Serve application.

Two deployments:
- `OppuReplica` (`replicas` of them): each loads the base model once and runs the very app of `oppu serve`
  (`oppu.serve.app.create_app` over a `Service`: continuous batching, LRU adapter slots, API keys, OpenAI error
  objects), called in-process through a small ASGI bridge, so both servers answer the same request the same way.
  Its `@serve.multiplexed` loader takes the request's `model` name as the multiplexed model id: Ray's router then
  sends later requests for that model to a replica that already holds it, so each replica keeps the adapters of
  the users routed to it hot in its own slots instead of every replica loading every user;
- `OpenAIRouter` (the HTTP ingress, no model): reads `model` from the JSON body and forwards the request, headers
  and body untouched, to a replica with `multiplexed_model_id` set; the answer streams back chunk by chunk
  (server-sent events included). Requests without a model (`GET /v1/models`, `/health`) go to any replica.

Every response carries `x-oppu-replica`, the id of the replica that answered. On a multi-node cluster the
artifacts folder (and a local model folder) must be at the same absolute path on every node (a shared
filesystem); `address` joins a running cluster, otherwise a local one is started with `num_cpus` CPUs.
"""

# no `from __future__ import annotations`: FastAPI must see `Request` itself in the ingress signature
import asyncio
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from oppu.errors import OppuError
from oppu.serve.service import ServeConfig

REPLICA_HEADER = "x-oppu-replica"
ROUTED_MODELS = ServeConfig().max_adapters
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@dataclass(frozen=True)
class RayOptions:
    """How the application is laid out on the cluster."""

    replicas: int = 1
    """Model replicas; each holds one copy of the base model and its own adapter slots."""
    replica_cpus: float = 1.0
    """CPUs Ray reserves per replica (its torch threads follow it)."""
    replica_gpus: float = 0.0
    """GPUs per replica; 0 with `--device cpu`, 1 per replica is what `--device cuda` takes by default."""
    max_ongoing_requests: int = 64
    """Requests one replica holds at once (its scheduler batches them); more queue at the router."""

    def __post_init__(self) -> None:
        from oppu.config import ConfigError

        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1 (got {self.replicas})")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ConfigError("replica_cpus and replica_gpus must be >= 0")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"max_ongoing_requests must be >= 1 (got {self.max_ongoing_requests})")


def portable(cfg: ServeConfig) -> ServeConfig:
    """Relative folders made absolute: a replica's working directory is not the driver's."""
    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path is not None and Path(path).exists() else path

    return replace(cfg, artifacts=str(Path(cfg.artifacts).resolve()), model=absolute(cfg.model),
                   cache_dir=str(Path(cfg.cache_dir).resolve()))


# -- the ASGI bridge -------------------------------------------------------------------------------------------


async def call_asgi(app, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes):
    """Run one HTTP request through an ASGI app in this process; yields `("start", status, headers)` and then
    `("body", bytes)` chunks as the app sends them. Closing the generator early (the client went away) tells the
    app the client disconnected, so a streaming answer stops decoding."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    out: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await out.put(message)

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield ("start", message["status"], [(bytes(k), bytes(v)) for k, v in message.get("headers", [])])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield ("body", bytes(message["body"]))
                if not message.get("more_body", False):
                    break
        await task
    finally:
        disconnected.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, 5)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()


# -- the deployments -------------------------------------------------------------------------------------------


@serve.deployment
class OppuReplica:
    """One base model, its adapter slots and scheduler, behind the app of `oppu serve`."""

    def __init__(self, cfg: ServeConfig, keys: dict[str, list[str]] | None):
        from oppu.serve.app import create_app
        from oppu.serve.auth import ApiKeys
        from oppu.serve.service import Service

        self.service = Service(cfg)
        self.app = create_app(self.service, ApiKeys(keys))
        context = serve.get_replica_context()
        self.replica_id = str(getattr(context.replica_id, "unique_id", context.replica_id))

    # Ray's router remembers the last ROUTED_MODELS names a replica loaded and sends their requests there; the
    # replica's own adapter cache (`--max-adapters`, the same default) decides what stays in its slots.
    @serve.multiplexed(max_num_models_per_replica=ROUTED_MODELS)
    async def served_model(self, model_id: str):
        """The served model a name means on this replica."""
        return self.service.registry.resolve(model_id)

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes):
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            try:
                await self.served_model(model_id)
            except OppuError:
                pass  # an unknown or unservable name: the app answers it with its OpenAI error object
        async for kind, *rest in call_asgi(self.app, method, path, query, headers, body):
            if kind == "start":
                status, out_headers = rest
                yield ("start", status, [*out_headers, (REPLICA_HEADER.encode(), self.replica_id.encode())])
            else:
                yield (kind, *rest)

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica_id, **self.service.scheduler.stats}

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


router_app = FastAPI(title="OPPU Studio serving (Ray)", docs_url=None, redoc_url=None, openapi_url=None)


def model_of(body: bytes) -> str:
    """The `model` field of a JSON body ('' when there is none: the replica's app reports what is wrong)."""
    try:
        data = json.loads(body or b"")
    except (UnicodeDecodeError, ValueError):
        return ""
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else ""


@serve.deployment
@serve.ingress(router_app)
class OpenAIRouter:
    """The HTTP ingress: routes each request to a replica by its `model`, streams the answer back."""

    def __init__(self, replica):
        self.replica = replica

    @router_app.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, path: str, request: Request):
        body = await request.body()
        handle = self.replica.options(stream=True, multiplexed_model_id=model_of(body))
        chunks = handle.handle.remote(request.method, request.url.path, request.url.query.encode(),
                                      list(request.headers.raw), body)
        _, status, headers = await chunks.__anext__()
        hop = {b"content-length", b"transfer-encoding", b"connection"}  # re-framed by this server
        kept = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.lower() not in hop}

        async def content():
            try:
                async for _, data in chunks:
                    yield data
            finally:
                chunks.cancel()

        return StreamingResponse(content(), status_code=status, headers=kept)


def build(cfg: ServeConfig, keys: dict[str, list[str]] | None = None, options: RayOptions | None = None):
    """The Ray Serve application (not started): `serve.run(build(...))`."""
    options = options or RayOptions()
    cfg = portable(cfg)
    replica = OppuReplica.options(
        num_replicas=options.replicas, max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus})
    return OpenAIRouter.options(ray_actor_options={"num_cpus": 0},
                                max_ongoing_requests=options.max_ongoing_requests * options.replicas
                                ).bind(replica.bind(cfg, keys))


def start(cfg: ServeConfig, keys: dict[str, list[str]] | None = None, options: RayOptions | None = None, *,
          host: str = "127.0.0.1", port: int = 8000, address: str | None = None, num_cpus: int | None = None,
          name: str = "oppu"):
    """Start (or join) a Ray cluster, run the application on `host:port` and wait until every replica is
    up; returns the router's handle. `serve.shutdown()` stops it."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build(cfg, keys, options), name=name, route_prefix="/")


def serve_forever(cfg: ServeConfig, keys: dict[str, list[str]] | None, options: RayOptions, *, host: str,
                  port: int, address: str | None = None) -> None:
    """`oppu serve --ray`: start, print where, block until Ctrl+C (or SIGTERM), then shut the application
    down (and the local cluster this process started)."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    start(cfg, keys, options, host=host, port=port, address=address)
    print(f"OPPU serving on Ray ({options.replicas} replica{'s' if options.replicas > 1 else ''}) on "
          f"http://{host}:{port}/v1{'  (API keys on)' if keys else ''}  (Ctrl+C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
