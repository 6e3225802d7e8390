"""`oppu serve --ray` on a local Ray cluster (2 CPUs, 2 model replicas, the tiny model): the same requests get
the same answers as `oppu serve` (chat, streaming, text completions, error objects, API keys), and Ray's model
multiplexing keeps sending a model's requests to the replica that loaded it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from test_serve_support import MAX_NEW, free_port, running_server, tiny_run

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow  # a Ray cluster and three actors start on 2 CPUs: ~40 s

KEYS = {"sk-alice-0001": ["alice"], "sk-admin-0001": ["*"]}


@pytest.fixture(scope="module")
def run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ray")
    cfg, run_id = tiny_run(tiny_model_dir, tiny_data_dir, root, methods=("none", "oppu", "oppu+rag"))
    return cfg, run_id


@pytest.fixture(scope="module")
def serve_cfg(run, tiny_model_dir):
    from oppu.serve.service import ServeConfig

    cfg, _ = run
    return ServeConfig(artifacts=cfg.artifacts_dir, model=str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def plain_url(serve_cfg):
    """`oppu serve` itself: the app over one in-process Service."""
    from oppu.serve.app import create_app
    from oppu.serve.auth import ApiKeys
    from oppu.serve.service import Service

    service = Service(serve_cfg)
    with running_server(create_app(service, ApiKeys(KEYS))) as url:
        yield url


@pytest.fixture(scope="module")
def ray_url(serve_cfg):
    import ray
    from ray import serve

    from oppu.serve.ray_app import RayOptions, start

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start(serve_cfg, KEYS, RayOptions(replicas=2, replica_cpus=0.5, max_ongoing_requests=16), port=port)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def requests_of(run_id):
    """(path, body, key) triples covering every kind of answer: personal models, task bases, the base, errors."""
    prompts = ("Which tag does this movie relate to? space ship love city dragon war",
               "Which tag does this movie relate to? old film hero night river laugh")
    out = []
    for prompt in prompts:
        for model in (f"{run_id}/alice", f"{run_id}/bob@rag", "LaMP_2M/carol", "LaMP_2M", "base"):
            out.append(("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                                 "max_tokens": MAX_NEW, "temperature": 0}, "sk-admin-0001"))
    out += [("/v1/completions", {"model": "base", "prompt": "space ship love", "max_tokens": 5}, "sk-admin-0001"),
            ("/v1/chat/completions", {"model": "nobody/nothing", "messages": [{"role": "user", "content": "hi"}]},
             "sk-admin-0001"),
            ("/v1/chat/completions", {"model": f"{run_id}/bob", "messages": [{"role": "user", "content": "hi"}]},
             "sk-alice-0001"),
            ("/v1/chat/completions", {"model": "base", "messages": "hi"}, "sk-admin-0001"),
            ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}]}, "sk-wrong-00")]
    return out


def post(url, path, body, key):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), resp.headers.get("x-oppu-replica")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers.get("x-oppu-replica")


def comparable(status, body):
    """What must agree between the two servers (ids and timestamps differ by construction)."""
    if "choices" in body:
        choice = body["choices"][0]
        return status, choice.get("message", {}).get("content", choice.get("text")), choice["finish_reason"], \
            body["usage"], body["model"]
    return status, body


def test_ray_answers_every_request_as_oppu_serve_does(plain_url, ray_url, run):
    _, run_id = run
    for path, body, key in requests_of(run_id):
        plain, ray = post(plain_url, path, body, key), post(ray_url, path, body, key)
        assert comparable(*ray[:2]) == comparable(*plain[:2]), (path, body["model"])
        assert ray[2], "every Ray answer names its replica"
    statuses = [post(ray_url, p, b, k)[0] for p, b, k in requests_of(run_id)]
    assert set(statuses) == {200, 400, 401, 403, 404}


def test_ray_streams_the_same_text(plain_url, ray_url, run):
    _, run_id = run
    prompt = "Which tag does this movie relate to? dragon war laugh old film hero"

    def streamed(url):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-alice-0001", max_retries=0, timeout=60)
        chunks = list(c.chat.completions.create(
            model=f"{run_id}/alice@rag", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_NEW,
            temperature=0, stream=True, stream_options={"include_usage": True}))
        return ("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices),
                [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1], chunks[-1].usage.completion_tokens)

    assert streamed(ray_url) == streamed(plain_url)


def test_a_models_requests_stay_on_the_replica_that_loaded_it(ray_url, run):
    _, run_id = run
    models = [f"{run_id}/{u}@{s}" for u in ("alice", "bob", "carol") for s in ("plain", "rag")]

    def ask(model):
        status, _, replica = post(ray_url, "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "space ship"}], "max_tokens": 2}, "sk-admin-0001")
        assert status == 200
        return replica

    for model in models:
        ask(model)
        time.sleep(0.3)  # the replica reports the model ids it holds to the router every 0.1 s
    time.sleep(1.0)
    placed = {model: {ask(model) for _ in range(3)} for model in models}
    assert all(len(replicas) == 1 for replicas in placed.values()), placed
    assert len({next(iter(r)) for r in placed.values()}) == 2, placed  # both replicas hold users' adapters
