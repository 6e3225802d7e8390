"""`oppu serve`: an OpenAI-compatible HTTP server for every personal adapter of an artifacts folder (core:
`oppu.serve`). Binds 127.0.0.1 unless told otherwise; `--api-keys` limits each key to its own users' models;
`--ray` runs the same app as a Ray Serve application (`oppu.serve.ray_app`)."""

from __future__ import annotations

import argparse
import os

from oppu.serve.service import ServeConfig

_DEFAULTS = ServeConfig()


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: only this machine)")
    add("--port", type=int, default=8000)
    add("--artifacts", default=os.environ.get("OPPU_ARTIFACTS", _DEFAULTS.artifacts),
        help="the runs' artifacts folder (default $OPPU_ARTIFACTS or runs/artifacts)")
    add("--model", default=None, help="base model the adapters were trained on (default: the embedded "
                                      "SmolLM2-135M-Instruct); a hub id or a local folder")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    add("--api-keys", default=None, help='JSON file {"<key>": ["<user id>", ...]}: each key may use only its '
                                         "users' personal models (without it the server is open)")
    add("--max-batch", type=int, default=_DEFAULTS.max_batch, help="rows decoding together at most")
    add("--max-adapters", type=int, default=_DEFAULTS.max_adapters,
        help="personal models held in memory at once (least recently used ones are evicted)")
    add("--max-prompt-tokens", type=int, default=_DEFAULTS.max_prompt_tokens,
        help="longer prompts are refused with a 400")
    add("--max-new-tokens", type=int, default=_DEFAULTS.max_new_tokens, help="largest max_tokens a request may ask")
    add("--ray", action="store_true", help="serve as a Ray Serve application: --replicas copies of the model, "
                                           "each request routed to a replica holding its user's adapter")
    add("--replicas", type=int, default=1, help="with --ray: model replicas (one GPU each with --device cuda)")
    add("--ray-address", default=None, help="with --ray: a running cluster to join (default: start a local one)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from oppu.config import ConfigError
    from oppu.serve.app import create_app
    from oppu.serve.auth import ApiKeys
    from oppu.serve.service import Service

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: use a TCP port between 1 and 65535")
    keys = ApiKeys.from_file(args.api_keys)
    cfg = ServeConfig(artifacts=args.artifacts, model=args.model, device=args.device, dtype=args.dtype,
                      max_batch=args.max_batch, max_adapters=args.max_adapters,
                      max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)
    if args.ray:
        from oppu.serve.ray_app import RayOptions, serve_forever

        options = RayOptions(replicas=args.replicas, replica_gpus=1.0 if args.device == "cuda" else 0.0)
        serve_forever(cfg, keys.keys, options, host=args.host, port=args.port, address=args.ray_address)
        return 0
    service = Service(cfg)
    served = service.registry.models()
    print(f"OPPU serving {len(served)} models ({sum(m.kind == 'user' for m in served)} personal) on "
          f"http://{args.host}:{args.port}/v1{'  (API keys on)' if keys.enabled else ''}  (Ctrl+C stops it)",
          flush=True)
    uvicorn.run(create_app(service, keys), host=args.host, port=args.port, log_level="warning")
    return 0
