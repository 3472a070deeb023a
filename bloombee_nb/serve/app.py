"""The FastAPI application: routes, authentication, admission, errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p
from .engine import Delta, Engine, GenerationSpec, Result
from .activity import Activity
from .errors import InvalidRequestError, ModelNotFoundError, QueueFullError, RateLimitError, ServeError
from .limits import Admission, RateLimiter, check_key


@dataclass(frozen=True)
class ServeSettings:
    """How a server admits requests (the CLI's and the magic's options)."""

    api_keys: tuple[str, ...] = ()            # empty: no authentication
    rate_per_minute: float | None = None      # per key (per client address without keys); None: unlimited
    burst: int = 10                           # requests a key may send at once before the rate applies
    max_running: int = 8                      # concurrent generations (sessions on the stages)
    max_queue: int = 32                       # requests waiting for a slot before 429


class _State:
    """What the routes share: engine, limits, the generation pool, the activity counters."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.pool = ThreadPoolExecutor(max_workers=settings.max_running, thread_name_prefix="bloombee-serve")
        self.admission = Admission(settings.max_running, settings.max_queue)
        self.limiter = RateLimiter(settings.rate_per_minute, settings.burst) if settings.rate_per_minute else None
        self.activity = Activity()
        self.created = int(time.time())

    def admit(self, request: Request) -> str:
        """Key, then rate (the queue is checked when a generation is submitted); raises 401/429.
        Returns who asks, as the activity names it: ``key N`` (its place in ``api_keys``) or, without
        keys, the client's address."""
        key = check_key(request.headers.get("authorization"), self.settings.api_keys)
        client = request.client.host if request.client else "?"
        who = f"key {self.settings.api_keys.index(key) + 1}" if key is not None else client
        if self.limiter is not None:
            try:
                self.limiter.take(key or client)
            except RateLimitError:
                self.activity.refuse(who)
                raise
        return who

    def check_model(self, name: str) -> None:
        if name not in (self.engine.name, getattr(self.engine.model.config, "_name_or_path", None)):
            raise ModelNotFoundError(f"the model {name!r} does not exist on this server; it serves "
                                     f"{self.engine.name!r} (GET /v1/models)", param="model")

    def submit(self, spec: GenerationSpec, who: str, emit=None, cancel: threading.Event | None = None):
        """Run ``spec`` for ``who`` on the pool (raises 429 when full); an asyncio future of its :class:`Result`."""
        try:
            self.admission.enter()
        except QueueFullError:
            self.activity.refuse(who)
            raise
        try:
            fut = self.pool.submit(self._run, spec, who, emit, cancel)
        except BaseException:
            self.admission.leave()
            raise
        self.activity.admitted(who)
        fut.add_done_callback(lambda f: self.admission.leave())
        return asyncio.wrap_future(fut)

    def _run(self, spec: GenerationSpec, who: str, emit, cancel) -> Result:
        """On a pool thread: the generation, counted while it runs and token by token."""
        self.activity.started()
        result = None
        try:
            result = self.engine.run(spec, emit, cancel, progress=lambda n: self.activity.generated(who, n))
            return result
        finally:
            self.activity.finished(result)


def create_app(engine: Engine, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The OpenAI-compatible app serving ``engine``'s model."""
    app = FastAPI(title="bloombee_nb", description="OpenAI-compatible API over a bloombee_nb swarm")
    state = app.state.bloombee = _State(engine, settings)
    _error_handlers(app, state)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    async def models(request: Request):
        state.admit(request)
        return p.models_body([engine.name], state.created)

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        state.admit(request)
        state.check_model(name)
        return p.model_card(engine.name, state.created)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        who = state.admit(request)
        state.check_model(body.model)
        spec = _spec(engine, engine.completion_ids(body.prompt), body, body.max_tokens)
        return await _answer(state, spec, who, body, "text_completion", p.new_id("cmpl"))

    @app.post("/v1/chat/completions")
    async def chat(body: p.ChatRequest, request: Request):
        who = state.admit(request)
        state.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        spec = _spec(engine, engine.chat_ids(messages), body, body.max_completion_tokens or body.max_tokens)
        return await _answer(state, spec, who, body, "chat.completion", p.new_id("chatcmpl"))

    return app


def _spec(engine: Engine, ids, body: p._Sampling, max_tokens: int | None) -> GenerationSpec:
    if unsupported := body.unsupported():
        raise InvalidRequestError(f"{', '.join(unsupported)} is not supported by this server: leave it out",
                                  param=unsupported[0])
    return engine.spec(ids, max_tokens, temperature=body.temperature, top_p=body.top_p, n=body.n,
                       stop=body.stops(), seed=body.seed)


async def _answer(state: _State, spec: GenerationSpec, who: str, body: p._Sampling, kind: str, rid: str):
    name = state.engine.name
    if not body.stream:
        result: Result = await state.submit(spec, who)
        return (p.completion_body if kind == "text_completion" else p.chat_body)(rid, name, result)
    # admitted (or refused with 429) before the 200 of the event stream goes out
    loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    future = state.submit(spec, who, lambda d: loop.call_soon_threadsafe(queue.put_nowait, d), cancel)
    future.add_done_callback(lambda f: queue.put_nowait(None))  # after every delta: both go through the loop
    return EventSourceResponse(_stream(state, spec, body, kind, rid, future, queue, cancel), ping=15)


async def _stream(state: _State, spec: GenerationSpec, body: p._Sampling, kind: str, rid: str,
                  future, queue: asyncio.Queue, cancel: threading.Event):
    """Server-sent events: one chunk per delta, usage (if asked), then ``[DONE]``. A client that
    hangs up cancels its generation (the stages free its session)."""
    name, chunk = state.engine.name, (p.completion_chunk if kind == "text_completion" else p.chat_chunk)
    try:
        if kind == "chat.completion":
            for i in range(spec.n):
                yield _event(p.chat_chunk(rid, name, i, {"role": "assistant", "content": ""}, None))
        while (delta := await queue.get()) is not None:
            yield _event(chunk(rid, name, delta.index, _payload(kind, delta), delta.finish_reason))
        result: Result = await future  # raises what generation raised: sent as an error event below
        if body.include_usage():
            yield _event(p.usage_chunk(rid, name, kind + ("" if kind == "text_completion" else ".chunk"),
                                       result.prompt_tokens, result.completion_tokens))
        yield {"data": "[DONE]"}
    except ServeError as exc:
        yield _event(exc.body())
    except Exception as exc:  # noqa: BLE001 - headers are sent: the error can only travel as an event
        yield _event({"error": {"message": f"internal error ({type(exc).__name__}: {exc})", "type": "server_error",
                                "param": None, "code": "internal_error"}})
    finally:
        cancel.set()


def _payload(kind: str, delta: Delta):
    return delta.text if kind == "text_completion" else ({"content": delta.text} if delta.text else {})


def _event(obj: dict) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False)}


def _error_handlers(app: FastAPI, state: _State) -> None:
    def respond(exc: ServeError) -> JSONResponse:
        headers = {"Retry-After": f"{max(1, round(exc.retry_after_s))}"} if hasattr(exc, "retry_after_s") else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ServeError)
    async def serve_error(request, exc: ServeError):
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return respond(InvalidRequestError(_validation_message(exc), param=_validation_param(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        body = ServeError(f"{exc.detail}: {request.method} {request.url.path}").body()
        body["error"]["code"] = "not_found" if exc.status_code == 404 else None
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        body = ServeError(f"internal error ({type(exc).__name__}: {exc}); the server keeps serving").body()
        body["error"].update(type="server_error", code="internal_error")
        return JSONResponse(body, status_code=500)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON: send a JSON object (Content-Type: application/json)"
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in errors[:5]]
    return "invalid request: " + "; ".join(parts)


def _validation_param(exc: RequestValidationError) -> str | None:
    errors = exc.errors()
    loc = errors[0].get("loc", ()) if errors else ()
    return str(loc[1]) if len(loc) > 1 else None
