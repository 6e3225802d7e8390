"""`oppu serve` over a tiny run: the `openai` client against a server on 127.0.0.1 (chat, text, streaming, models),
answers equal to the run's own predictions, OpenAI error objects for bad requests, API keys that cannot reach
another user's adapter, and concurrent users batched with the same answers as one at a time."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_serve_support import MAX_NEW, running_server, tiny_run

openai = pytest.importorskip("openai")

USERS = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg, run_id = tiny_run(tiny_model_dir, tiny_data_dir, root)
    return cfg, run_id, root


@pytest.fixture(scope="module")
def predictions(run):
    """{(user, method): [(prompt, raw output)]} as the run stored them."""
    from oppu.store import Store

    cfg, run_id, _ = run
    out = {}
    for user in USERS:
        df = Store(cfg.db).predictions_for(run_id, user)
        for method, group in df.groupby("method"):
            out[(user, method)] = list(zip(group["prompt"], group["raw_output"], strict=True))
    return out


def make_service(run, tiny_model_dir, **overrides):
    from oppu.serve.service import ServeConfig, Service

    _, _, root = run
    return Service(ServeConfig(artifacts=str(root / "art"), model=str(tiny_model_dir), device="cpu", **overrides))


@pytest.fixture(scope="module")
def service(run, tiny_model_dir):
    svc = make_service(run, tiny_model_dir)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def server(service):
    from oppu.serve.app import create_app

    with running_server(create_app(service, close_service=False)) as url:
        yield url


def client(url, key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def model_of(run_id, user, method):
    return {"none": "LaMP_2M", "rag": "LaMP_2M@rag", "oppu": f"{run_id}/{user}",
            "oppu+rag": f"{run_id}/{user}@rag"}[method]


def chat(c, model, prompt, **kw):
    reply = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                      max_tokens=MAX_NEW, temperature=0, **kw)
    return reply.choices[0].message.content


def post(url, path, body: bytes | dict, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                 **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# -- answers -------------------------------------------------------------------------------------------------


def test_models_lists_base_task_bases_and_every_personal_adapter(server, run):
    _, run_id, _ = run
    ids = {m.id for m in client(server).models.list().data}
    assert {"base", "LaMP_2M@plain", "LaMP_2M@rag"} <= ids
    assert {f"{run_id}/{u}@{s}" for u in USERS for s in ("plain", "rag")} <= ids


def test_chat_answers_are_the_runs_own_predictions(server, run, predictions):
    """Every method's stored answer comes back from the server for the same prompt: the personal model is the
    user's adapter over its task-adapted base, the task name is the task-adapted base."""
    _, run_id, _ = run
    c = client(server)
    for (user, method), rows in predictions.items():
        for prompt, raw in rows:
            assert chat(c, model_of(run_id, user, method), prompt) == raw, (user, method)


def test_task_name_and_newest_run_resolve(server, run, predictions):
    _, run_id, _ = run
    prompt, raw = predictions[("alice", "oppu")][0]
    assert chat(client(server), "LaMP_2M/alice", prompt) == raw
    assert chat(client(server), f"{run_id}/alice@plain", prompt) == raw


def test_streaming_gives_the_same_text_in_chunks(server, run, predictions):
    _, run_id, _ = run
    prompt, raw = predictions[("bob", "oppu+rag")][0]
    stream = client(server).chat.completions.create(
        model=f"{run_id}/bob@rag", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_NEW,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == raw
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_NEW


def test_text_completions_plain_and_streamed(server):
    c = client(server)
    whole = c.completions.create(model="base", prompt="space ship love", max_tokens=5, temperature=0)
    assert whole.usage.completion_tokens == 5 and whole.choices[0].finish_reason == "length"
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model="base", prompt="space ship love", max_tokens=5, stream=True))
    assert streamed == whole.choices[0].text


def test_stop_string_cuts_the_answer(server):
    c = client(server)
    full = c.completions.create(model="base", prompt="love city", max_tokens=8).choices[0].text
    assert len(full) > 2
    stop = full[2:4]
    cut = c.completions.create(model="base", prompt="love city", max_tokens=8, stop=[stop]).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"


# -- errors --------------------------------------------------------------------------------------------------


def _is_openai_error(body):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests_get_openai_error_objects_and_4xx(server, service):
    status, body = post(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and _is_openai_error(body)["code"] == "invalid_json"
    status, body = post(server, "/v1/chat/completions", {"model": "nobody/nothing",
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and _is_openai_error(body)["code"] == "model_not_found"
    status, body = post(server, "/v1/chat/completions", {"model": "base", "messages": "hi"})
    assert status == 400 and _is_openai_error(body)["param"] == "messages"
    status, body = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and _is_openai_error(body)["param"] == "model"
    huge = " ".join(["space ship"] * service.cfg.max_prompt_tokens)
    status, body = post(server, "/v1/chat/completions", {"model": "base",
                                                         "messages": [{"role": "user", "content": huge}]})
    assert status == 400 and _is_openai_error(body)["code"] == "context_length_exceeded"
    status, body = post(server, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 10**6})
    assert status == 400 and _is_openai_error(body)["param"] == "max_tokens"
    status, body = post(server, "/v1/completions", {"model": "base", "prompt": "x", "n": 3})
    assert status == 400 and _is_openai_error(body)["param"] == "n"
    status, body = post(server, "/v1/nothing-here", {})
    assert status == 404 and _is_openai_error(body)
    with pytest.raises(openai.NotFoundError) as err:
        chat(client(server), "LaMP_2M/nobody", "hi")
    assert err.value.code == "model_not_found"


def test_api_key_reaches_only_its_own_users_adapters(run, service, tmp_path, predictions):
    from oppu.serve.app import create_app
    from oppu.serve.auth import ApiKeys

    _, run_id, _ = run
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"sk-alice-0001": ["alice"], "sk-admin-0001": ["*"]}))
    app = create_app(service, ApiKeys.from_file(keys_file), close_service=False)
    prompt, raw = predictions[("alice", "oppu")][0]
    bob_prompt, _ = predictions[("bob", "oppu")][0]
    with running_server(app) as url:
        alice = client(url, "sk-alice-0001")
        assert chat(alice, f"{run_id}/alice", prompt) == raw
        with pytest.raises(openai.PermissionDeniedError) as denied:
            chat(alice, f"{run_id}/bob", bob_prompt)
        assert denied.value.status_code == 403 and denied.value.code == "model_forbidden"
        with pytest.raises(openai.PermissionDeniedError):  # the task name of bob's newest run too
            chat(alice, "LaMP_2M/bob@rag", bob_prompt)
        visible = {m.id for m in alice.models.list().data}
        assert f"{run_id}/alice@plain" in visible and not any("/bob" in m or "/carol" in m for m in visible)
        assert chat(alice, "LaMP_2M", prompt)  # the task-adapted base is not a user's adapter
        with pytest.raises(openai.AuthenticationError):
            chat(client(url, "sk-wrong-0000"), f"{run_id}/alice", prompt)
        status, body = post(url, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
        assert status == 401 and _is_openai_error(body)["code"] == "invalid_api_key"
        assert chat(client(url, "sk-admin-0001"), f"{run_id}/bob", bob_prompt)


# -- batching ------------------------------------------------------------------------------------------------


def _concurrently(calls):
    results, errors = [None] * len(calls), []
    barrier = threading.Barrier(len(calls))

    def work(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_concurrent_users_are_batched_with_their_single_user_answers(server, service, run, predictions):
    _, run_id, _ = run
    c = client(server)
    jobs = [(model_of(run_id, u, m), p) for (u, m), rows in predictions.items() for p, _ in rows]
    alone = [chat(c, model, prompt) for model, prompt in jobs]
    before = service.scheduler.max_rows_seen
    service.scheduler.max_rows_seen = 0
    together = _concurrently([lambda m=m, p=p: chat(c, m, p) for m, p in jobs])
    assert together == alone
    assert service.scheduler.max_rows_seen > 1  # rows of several users decoded in one step
    service.scheduler.max_rows_seen = max(before, service.scheduler.max_rows_seen)


def test_a_request_joins_a_running_batch_and_leaves_first(service):
    from oppu.serve.scheduler import GenRequest

    long_ids = service.text_ids("space ship love city dragon")
    short_ids = service.text_ids("old film hero")
    base = service.registry.resolve("base")
    solo_long, solo_short = (service.complete_ids(base, [ids], n)[0] for ids, n in ((long_ids, 60), (short_ids, 3)))
    order, tokens = [], {"long": [], "short": []}
    started = threading.Event()

    def sink(name):
        def emit(event):
            if event[0] == "token":
                tokens[name].append(event[1])
                if name == "long" and len(tokens["long"]) == 5:
                    started.set()
            else:
                order.append(name)
        return emit

    service.scheduler.submit(GenRequest(long_ids, base, 60, sink("long")))
    assert started.wait(30)
    service.scheduler.submit(GenRequest(short_ids, base, 3, sink("short")))
    deadline = time.monotonic() + 30
    while len(order) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["short", "long"]
    assert tokens == {"long": solo_long, "short": solo_short}


def test_more_active_users_than_slots_evict_least_recently_used(run, tiny_model_dir, predictions):
    _, run_id, _ = run
    svc = make_service(run, tiny_model_dir, max_adapters=2)
    try:
        jobs = [(model_of(run_id, u, m), p, raw) for (u, m), rows in predictions.items() if m.startswith("oppu")
                for p, raw in rows]
        got = _concurrently([lambda m=m, p=p: svc.complete(m, [p], MAX_NEW)[0] for m, p, _ in jobs])
        assert got == [raw for _, _, raw in jobs]
        assert svc.cache.held <= 2 and svc.cache.evictions > 0
    finally:
        svc.close()
