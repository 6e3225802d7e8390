"""The HTTP face of `oppu serve`: OpenAI-shaped `/v1/chat/completions`, `/v1/completions` and `/v1/models`
(FastAPI), streaming as server-sent events, over a `Service`.

Every error a client can cause is answered with OpenAI's error object `{"error": {"message", "type", "param",
"code"}}` and a 4xx status: malformed JSON or fields (400), an unknown model (404), an oversized prompt (400,
`context_length_exceeded`), a missing or wrong key (401), another user's model (403). A 500 means a bug.
Each request is parsed here and handed to the scheduler thread; its tokens come back through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from oppu.errors import OppuError
from oppu.serve.auth import ApiKeys, AuthError

# -- request bodies --------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Body):
    prompt: str | list[str]


# -- errors ----------------------------------------------------------------------------------------------------


class ApiError(OppuError):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def as_api_error(exc: BaseException) -> ApiError:
    """The status and error object for anything a request can raise."""
    from oppu.serve.cache import AdapterLoadError
    from oppu.serve.registry import UnknownModel, WrongBase
    from oppu.serve.service import PromptTooLong

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AuthError):
        return ApiError(exc.status, str(exc), "invalid_request_error" if exc.status == 401 else "permission_error",
                        "model" if exc.status == 403 else None, exc.code)
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, WrongBase | AdapterLoadError):
        return ApiError(400, str(exc), param="model", code="model_not_servable")
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, OppuError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error ({type(exc).__name__}): see the server log", "server_error")


def _json_error(exc: BaseException) -> JSONResponse:
    err = as_api_error(exc)
    return JSONResponse(error_body(str(err), err.type, err.param, err.code), status_code=err.status)


async def _parse(request: Request, model: type[BaseModel]):
    raw = await request.body()
    try:
        data = json.loads(raw or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise ApiError(400, f"invalid field {param}: {first.get('msg')}", param=param,
                       code="invalid_value") from exc


# -- the app ---------------------------------------------------------------------------------------------------


def create_app(service, keys: ApiKeys | None = None, close_service: bool = True) -> FastAPI:
    """The FastAPI app over a `Service` (closed when the app shuts down, unless `close_service` is False)."""
    keys = keys or ApiKeys(None)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        if close_service:
            service.close()

    app = FastAPI(title="OPPU Studio serving", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(Exception)
    async def _any(_request, exc):
        return _json_error(exc)

    @app.exception_handler(OppuError)
    async def _oppu(_request, exc):
        return _json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc):
        return _json_error(ApiError(400, f"invalid request: {exc.errors()[:1]}", code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _json_error(ApiError(exc.status_code, str(exc.detail), code=code))

    def authorize(request: Request):
        return keys.users_of(request.headers.get("authorization"))

    def model_card(m) -> dict[str, Any]:
        return {"id": m.id, "object": "model", "created": 0, "owned_by": f"user:{m.user_id}" if m.user_id else "oppu",
                "kind": m.kind, "task": m.task, "run_id": m.run_id, "style": m.style}

    @app.get("/v1/models")
    async def list_models(request: Request):
        users = authorize(request)
        return {"object": "list",
                "data": [model_card(m) for m in service.registry.models() if ApiKeys.visible(users, m)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        users = authorize(request)
        model = service.registry.resolve(name)
        ApiKeys.check(users, model)
        return model_card(model)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, **service.scheduler.stats}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        users = authorize(request)
        body = await _parse(request, ChatRequest)
        model = service.registry.resolve(body.model)
        ApiKeys.check(users, model)
        ids = service.chat_ids([{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                                for m in body.messages])
        budget = body.max_completion_tokens or body.max_tokens
        return await _answer(service, body, model, ids, budget, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        users = authorize(request)
        body = await _parse(request, CompletionRequest)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(400, "send one prompt per request (a list of exactly one string)", param="prompt")
            body.prompt = body.prompt[0]
        model = service.registry.resolve(body.model)
        ApiKeys.check(users, model)
        return await _answer(service, body, model, service.text_ids(body.prompt), body.max_tokens, chat=False)

    return app


# -- answering -------------------------------------------------------------------------------------------------


class _Stream:
    """One request's tokens as they come from the scheduler thread, with stop strings and incremental text."""

    def __init__(self, service, body, model, ids, budget):
        self.service, self.body = service, body
        self.stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish: str | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        temperature = body.temperature if body.temperature is not None else 0.0
        self.req = service.submit(model, ids, budget, lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev),
                                  temperature=temperature, top_p=body.top_p or 1.0, seed=body.seed)

    async def deltas(self):
        """New text as it becomes final (a partial UTF-8 character or a possible stop string is held back)."""
        while self.finish is None:
            kind, value = await self.queue.get()
            if kind == "error":
                raise value
            if kind == "done":
                self.finish = "stop" if value == "cancelled" else value
                self.text = self.service.decode(self.tokens)
            else:
                self.tokens.append(value)
                self.text = self.service.decode(self.tokens)
                cut = min((i for i in (self.text.find(s) for s in self.stops if s) if i >= 0), default=-1)
                if cut >= 0:
                    self.text, self.finish = self.text[:cut], "stop"
                    self.req.cancelled.set()
            hold = 0 if self.finish else (1 if self.text.endswith("\ufffd") else 0) + max(
                (len(s) - 1 for s in self.stops), default=0)
            ready = len(self.text) - hold
            if ready > self.sent:
                delta, self.sent = self.text[self.sent:ready], ready
                yield delta

    def cancel(self) -> None:
        self.req.cancelled.set()


async def _answer(service, body, model, ids: list[int], budget: int | None, chat: bool):
    if budget is not None and budget > service.cfg.max_new_tokens:
        raise ApiError(400, f"max_tokens {budget} is more than this server allows ({service.cfg.max_new_tokens})",
                       param="max_tokens", code="invalid_value")
    budget = budget or service.default_budget(model)
    stream = _Stream(service, body, model, ids, budget)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    def usage():
        return {"prompt_tokens": len(ids), "completion_tokens": len(stream.tokens),
                "total_tokens": len(ids) + len(stream.tokens)}

    if not body.stream:
        try:
            async for _ in stream.deltas():
                pass
        finally:
            stream.cancel()
        choice = ({"index": 0, "message": {"role": "assistant", "content": stream.text},
                   "finish_reason": stream.finish, "logprobs": None} if chat else
                  {"index": 0, "text": stream.text, "finish_reason": stream.finish, "logprobs": None})
        return {"id": rid, "object": kind, "created": created, "model": model.id, "choices": [choice],
                "usage": usage()}

    from sse_starlette.sse import EventSourceResponse

    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            d = ({"role": "assistant", "content": ""} if first else {} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return json.dumps({"id": rid, "object": chunk_kind, "created": created, "model": model.id,
                           "choices": [choice]})

    async def events():
        try:
            if chat:
                yield {"data": chunk(None, None, first=True)}
            async for delta in stream.deltas():
                yield {"data": chunk(delta, None)}
            yield {"data": chunk(None, stream.finish)}
            if include_usage:
                yield {"data": json.dumps({"id": rid, "object": chunk_kind, "created": created, "model": model.id,
                                           "choices": [], "usage": usage()})}
            yield {"data": "[DONE]"}
        except Exception as exc:  # noqa: BLE001 - the status line is sent already: the error goes in the stream
            err = as_api_error(exc)
            yield {"data": json.dumps(error_body(str(err), err.type, err.param, err.code))}
        finally:
            stream.cancel()

    return EventSourceResponse(events(), ping=15)
