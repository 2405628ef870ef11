"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model held in memory.

Handlers validate and tokenize on the event loop, then queue a `Job` for the generation worker
(server_engine.py) and relay its events: as one JSON body, or as server-sent events ending in
`data: [DONE]`. A client that goes away has its job cancelled at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .constrain import Limits, check_request
from .errors import MistralError
from .generate import Response as Piece
from .server_api import ChatRequest, CompletionRequest, OpenAIError, SamplingRequest, error_location
from .server_engine import Engine, Failed, Finished, Job
from .server_metrics import CONTENT_TYPE, Metrics
from .server_reply import ReplyAssembler
from .tools import validate_request

log = logging.getLogger("mlx_mistral.server")

DEFAULT_TEMPERATURE = 0.15  # Mistral's recommendation for Mistral Small 3, as in the CLI
DISCONNECT_POLL_S = 0.2  # how often a waiting request checks that its client is still there
SEED_MODULUS = 2**32  # mx.random.seed takes an unsigned 64-bit value; clients send any int


class _Settings:
    def __init__(self, model_id: str, aliases: set[str], context_length: int, api_key: Optional[str],
                 default_max_tokens: Optional[int], limits: Limits):
        self.model_id, self.aliases = model_id, aliases | {model_id}
        self.context_length, self.api_key, self.default_max_tokens = context_length, api_key, default_max_tokens
        self.limits = limits
        self.created = int(time.time())


def create_app(model, tokenizer, *, model_id: str = "mlx-mistral", aliases: set[str] = frozenset(),
               api_key: Optional[str] = None, context_length: Optional[int] = None,
               default_max_tokens: Optional[int] = None, prefix_cache: bool = True,
               limits: Optional[Limits] = None) -> FastAPI:
    """The ASGI app serving `model`; its generation worker runs for the app's lifespan.

    `limits` bound the values of constrained tool calls and JSON replies where their schemas
    leave them unbounded (see `constrain.Limits`; the library's defaults when None)."""
    settings = _Settings(model_id, set(aliases), context_length or model.args.max_position_embeddings,
                         api_key, default_max_tokens, limits or Limits())
    metrics = Metrics()
    engine = Engine(model, tokenizer, metrics, prefix_cache=prefix_cache)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="mlx-mistral", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    _install_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)
    bearer = HTTPBearer(auto_error=False)

    async def authorize(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if settings.api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials, settings.api_key):
            raise OpenAIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                              code="invalid_api_key")

    guarded = [Depends(authorize)]

    def check_model(name: Optional[str]) -> None:
        if name and name not in settings.aliases:
            raise OpenAIError(404, f"The model '{name}' does not exist; this server serves "
                              f"'{settings.model_id}'.", param="model", code="model_not_found")

    def generation_params(body: SamplingRequest, n_prompt: int, prompt_param: str) -> dict:
        """stream_generate keyword arguments; refuses prompts the context cannot hold."""
        ctx = settings.context_length
        if n_prompt >= ctx:
            raise OpenAIError(400, f"This model's maximum context length is {ctx} tokens, but the "
                              f"prompt has {n_prompt} tokens.", param=prompt_param, code="context_length_exceeded")
        room = ctx - n_prompt
        max_tokens = body.length_limit
        if max_tokens is None:
            max_tokens = min(room, settings.default_max_tokens or room)
        elif max_tokens > room:
            raise OpenAIError(400, f"This model's maximum context length is {ctx} tokens: the prompt has "
                              f"{n_prompt} tokens and max_tokens asks for {max_tokens} more.",
                              param="max_tokens", code="context_length_exceeded")
        temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
        return dict(max_tokens=max_tokens, temperature=temperature, top_p=body.top_p, stop=body.stop,
                    seed=None if body.seed is None else body.seed % SEED_MODULUS)

    async def run(request: Request, ids: list[int], params: dict) -> AsyncIterator[object]:
        """Queue a job and yield its events; cancels it if the client leaves (or we stop)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                job.cancel()

        job = Job(ids, params, emit)
        engine.submit(job)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                if await request.is_disconnected():
                    return
                if event is None:
                    continue
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            job.cancel()  # a no-op for a finished job; frees the worker from an abandoned one

    # -- endpoints --------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id}

    @app.get("/metrics", dependencies=guarded)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": settings.created, "owned_by": "mlx-mistral"}

    @app.get("/v1/models", dependencies=guarded)
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def get_model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        messages = [m.to_openai() for m in body.messages]
        constraint = body.constraint()

        def encode() -> list[int]:
            validate_request(messages, constraint["tools"])
            return tokenizer.encode_chat(messages, tools=body.prompt_tools())

        try:
            ids = await asyncio.to_thread(encode)
        except MistralError as e:
            raise OpenAIError(400, str(e), param="messages") from None
        try:  # refused here, not by the worker, so a bad request is a 400 before any stream chunk
            await asyncio.to_thread(check_request, tokenizer, limits=settings.limits, **constraint)
        except MistralError as e:
            raise OpenAIError(400, str(e)) from None
        params = generation_params(body, len(ids), "messages") | constraint | {"limits": settings.limits}
        meta = _Meta("chatcmpl", settings.model_id)
        events = run(request, ids, params)
        if body.stream:
            return _sse(_chat_chunks(events, meta, ReplyAssembler(tokenizer), body.include_usage))
        reply = ReplyAssembler(tokenizer)
        async for event in events:
            if isinstance(event, Piece):
                reply.feed(event.text, event.token)
            elif isinstance(event, Finished):
                _, finish_reason = reply.finish(event.finish_reason)
                choice = {"index": 0, "message": reply.message(), "finish_reason": finish_reason,
                          "logprobs": None}
                return meta.body("chat.completion", [choice], _usage(event))
            elif isinstance(event, Failed):
                raise OpenAIError(500, event.message, type="server_error")
        return _client_gone()

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if isinstance(body.prompt, str):
            ids = await asyncio.to_thread(tokenizer.encode, body.prompt)
        else:
            ids = body.prompt
            if not all(0 <= i < tokenizer.vocab_size for i in ids):
                raise OpenAIError(400, f"token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        if not ids:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        params = generation_params(body, len(ids), "prompt")
        meta = _Meta("cmpl", settings.model_id)
        events = run(request, ids, params)
        if body.stream:
            return _sse(_completion_chunks(events, meta, body.include_usage))
        text = []
        async for event in events:
            if isinstance(event, Piece):
                text.append(event.text)
            elif isinstance(event, Finished):
                choice = {"index": 0, "text": "".join(text), "finish_reason": event.finish_reason, "logprobs": None}
                return meta.body("text_completion", [choice], _usage(event))
            elif isinstance(event, Failed):
                raise OpenAIError(500, event.message, type="server_error")
        return _client_gone()

    return app


# -- response shapes ------------------------------------------------------------------------------

class _Meta:
    """id, creation time and model name shared by every chunk of one response."""

    def __init__(self, prefix: str, model_id: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_id

    def body(self, obj: str, choices: list, usage: Optional[dict] = None, with_usage: bool = True) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if with_usage:
            out["usage"] = usage
        return out


def _usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def _client_gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_chunks(events, meta: _Meta, reply: ReplyAssembler, include_usage: bool) -> AsyncIterator[dict]:
    def chunk(delta: dict, finish_reason: Optional[str] = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return meta.body("chat.completion.chunk", [choice], None, with_usage=include_usage)

    yield chunk({"role": "assistant", "content": ""})
    async for event in events:
        if isinstance(event, Piece):
            for delta in reply.feed(event.text, event.token):
                yield chunk(delta)
        elif isinstance(event, Finished):
            deltas, finish_reason = reply.finish(event.finish_reason)
            for delta in deltas:
                yield chunk(delta)
            yield chunk({}, finish_reason)
            if include_usage:
                yield meta.body("chat.completion.chunk", [], _usage(event))
        elif isinstance(event, Failed):
            yield OpenAIError(500, event.message, type="server_error").body()


async def _completion_chunks(events, meta: _Meta, include_usage: bool) -> AsyncIterator[dict]:
    def chunk(text: str, finish_reason: Optional[str] = None) -> dict:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return meta.body("text_completion", [choice], None, with_usage=include_usage)

    async for event in events:
        if isinstance(event, Piece) and event.text:
            yield chunk(event.text)
        elif isinstance(event, Finished):
            yield chunk("", event.finish_reason)
            if include_usage:
                yield meta.body("text_completion", [], _usage(event))
        elif isinstance(event, Failed):
            yield OpenAIError(500, event.message, type="server_error").body()


# -- errors and request accounting ------------------------------------------------------------------

def _install_error_handlers(app: FastAPI) -> None:
    def reply(e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(OpenAIError)
    async def openai_error(request, e: OpenAIError):
        return reply(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": (), "type": ""}
        if first.get("type") == "json_invalid":
            return reply(OpenAIError(400, "The request body is not valid JSON: "
                                     f"{first.get('ctx', {}).get('error', first['msg'])}", code="invalid_json"))
        param = error_location(tuple(first.get("loc", ())))
        message = first["msg"] + (f" (at {param})" if param else "")
        return reply(OpenAIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else None
        return reply(OpenAIError(e.status_code, str(e.detail), code=kind))


class _CountRequests:
    """Counts responses by path and status (pure ASGI: leaves streaming and disconnects alone)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = route.path if route is not None else "other"  # unknown paths share one label
                self.metrics.requests.labels(path=path, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


# -- running it -----------------------------------------------------------------------------------

def served_name(model_path: str) -> tuple[str, set[str]]:
    """The id clients see (a hub id as is, a folder by its name) and the names also accepted."""
    path = Path(model_path).expanduser()
    if path.exists():
        return path.resolve().name, {model_path, str(path.resolve())}
    return model_path, {model_path}


def _quiet_exit_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the stop signal once it has shut down gracefully; a drained stop on
        Ctrl-C or SIGTERM is the normal end of `serve` here (exit status 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8080, api_key: Optional[str] = None,
          default_max_tokens: Optional[int] = None, drain_timeout: float = 30.0, log_level: str = "info") -> None:
    """Load the model and serve it until Ctrl-C or SIGTERM; in-flight requests finish first
    (for up to `drain_timeout` seconds)."""
    import uvicorn

    from .load import load

    model, tokenizer = load(model_path)
    model_id, aliases = served_name(model_path)
    app = create_app(model, tokenizer, model_id=model_id, aliases=aliases, api_key=api_key,
                     default_max_tokens=default_max_tokens)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout)
    server = _quiet_exit_server()(config)
    server.run()
    if not server.started:
        raise MistralError(f"could not serve on {host}:{port} (is the port in use?)")
