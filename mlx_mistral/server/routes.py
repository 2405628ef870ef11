"""The endpoints: /health, /metrics, /v1/models, /v1/chat/completions, /v1/completions.

Handlers validate and tokenize on the event loop, then queue a `Job` for the generation worker
(worker.py) and relay its events: as one JSON body, or as server-sent events ending in
`data: [DONE]`. A client that goes away has its job cancelled at the next token. What they share
(settings, worker, metrics, tokenizer) they read from `request.app.state`, set by `create_app`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..budget import fit_to_budget
from ..constrain import check_request
from ..errors import MistralError
from ..generate import Response as Piece
from ..generate import build_request
from ..tools import validate_request
from .auth import authorize
from .errors import OpenAIError
from .metrics import CONTENT_TYPE
from .replies import Logprobs, Meta, ReplyAssembler, chat_chunks, client_gone, completion_chunks, sse, usage
from .schemas import ChatRequest, CompletionRequest, SamplingRequest
from .worker import Failed, Finished, Job

if TYPE_CHECKING:
    from .app import Settings

DEFAULT_TEMPERATURE = 0.15  # Mistral's recommendation for Mistral Small 3, as in the CLI
DISCONNECT_POLL_S = 0.2  # how often a waiting request checks that its client is still there

router = APIRouter()
guarded = [Depends(authorize)]


def check_model(settings: Settings, name: Optional[str]) -> None:
    if name and name not in settings.aliases:
        raise OpenAIError(404, f"The model '{name}' does not exist; this server serves "
                          f"'{settings.model_id}'.", param="model", code="model_not_found")


def check_n(request: Request, n: int) -> None:
    batch = request.app.state.worker.engine.max_batch
    if n > batch:  # n replies run as one batch
        raise OpenAIError(400, f"n={n} is more than this server's batch of {batch} (serve --max-batch)", param="n")


def generation_params(settings: Settings, body: SamplingRequest, n_prompt: int, prompt_param: str,
                      vocab_size: int) -> dict:
    """stream_generate keyword arguments; refuses prompts the context cannot hold."""
    ctx = settings.context_length
    if n_prompt >= ctx:
        raise OpenAIError(400, f"This model's maximum context length is {ctx} tokens, but the "
                          f"prompt has {n_prompt} tokens.", param=prompt_param, code="context_length_exceeded")
    room = ctx - n_prompt
    max_tokens = body.length_limit
    if max_tokens is None:
        max_tokens = min(room, settings.default_max_tokens)
    elif max_tokens > room:
        raise OpenAIError(400, f"This model's maximum context length is {ctx} tokens: the prompt has "
                          f"{n_prompt} tokens and max_tokens asks for {max_tokens} more.",
                          param="max_tokens", code="context_length_exceeded")
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    bias = {int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None
    if bias and not all(0 <= k < vocab_size for k in bias):
        raise OpenAIError(400, f"logit_bias keys must be token ids in [0, {vocab_size})", param="logit_bias")
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=body.top_p, stop=body.stop,
                seed=body.seed,  # any int: the sampler reduces it to its 64-bit key
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                logit_bias=bias, logprobs=body.logprobs_k, n=body.n)


async def run(request: Request, ids: list[int], params: dict) -> AsyncIterator[object]:
    """Queue a job and yield its events; cancels it if the client leaves (or we stop)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            job.cancel()

    tokenizer = request.app.state.tokenizer
    try:
        job = Job(build_request(tokenizer, ids, **params), emit)
        request.app.state.worker.submit(job)
    except MistralError as e:  # checked before anything streams: a plain 400
        raise OpenAIError(400, str(e)) from None
    replies, finished = params.get("n", 1), 0
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
            finished += isinstance(event, Finished)
            if isinstance(event, Failed) or finished == replies:
                return
    finally:
        job.cancel()  # a no-op for a finished job; frees the worker from an abandoned one


def model_card(settings: Settings) -> dict:
    return {"id": settings.model_id, "object": "model", "created": settings.created, "owned_by": "mlx-mistral"}


# -- endpoints --------------------------------------------------------------------------------------

@router.get("/health")
async def health(request: Request):
    return {"status": "ok", "model": request.app.state.settings.model_id}


@router.get("/metrics", dependencies=guarded)
async def prometheus_metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", dependencies=guarded)
async def list_models(request: Request):
    return {"object": "list", "data": [model_card(request.app.state.settings)]}


@router.get("/v1/models/{name:path}", dependencies=guarded)
async def get_model(name: str, request: Request):
    settings = request.app.state.settings
    check_model(settings, name)
    return model_card(settings)


async def prepare_chat(body: ChatRequest, request: Request) -> tuple[list[int], dict]:
    """(prompt ids, generation keywords) of a chat request, or the 400 that refuses it."""
    settings, tokenizer = request.app.state.settings, request.app.state.tokenizer
    check_model(settings, body.model)
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
    params = generation_params(settings, body, len(ids), "messages", tokenizer.vocab_size)
    try:  # a forced call the budget cannot hold: also refused before any stream chunk
        await asyncio.to_thread(fit_to_budget, tokenizer, constraint["tools"], constraint["tool_choice"],
                                settings.limits, params["max_tokens"])
    except MistralError as e:
        raise OpenAIError(400, str(e), param="max_tokens") from None
    return ids, params | constraint | {"limits": settings.limits}


@router.post("/v1/chat/completions", dependencies=guarded)
async def chat_completions(body: ChatRequest, request: Request):
    settings, tokenizer = request.app.state.settings, request.app.state.tokenizer
    check_n(request, body.n)
    ids, params = await prepare_chat(body, request)
    meta = Meta("chatcmpl", settings.model_id)
    events = run(request, ids, params)
    replies = [ReplyAssembler(tokenizer) for _ in range(body.n)]
    logprobs = [Logprobs(tokenizer, body.logprobs) for _ in range(body.n)]
    if body.stream:
        return sse(chat_chunks(events, meta, replies, body.include_usage, logprobs))
    choices, done = [None] * body.n, []
    async for event in events:
        if isinstance(event, Piece):
            logprobs[event.index].add(event)
            replies[event.index].feed(event.text, event.token)
        elif isinstance(event, Finished):
            i = event.index
            _, finish_reason = replies[i].finish(event.finish_reason)
            choices[i] = {"index": i, "message": replies[i].message(), "finish_reason": finish_reason,
                          "logprobs": logprobs[i].chat()}
            done.append(event)
            if len(done) == body.n:
                return meta.body("chat.completion", choices, usage(done))
        elif isinstance(event, Failed):
            raise OpenAIError(500, event.message, type="server_error")
    return client_gone()


@router.post("/v1/completions", dependencies=guarded)
async def completions(body: CompletionRequest, request: Request):
    settings, tokenizer = request.app.state.settings, request.app.state.tokenizer
    check_model(settings, body.model)
    if isinstance(body.prompt, str):
        ids = await asyncio.to_thread(tokenizer.encode, body.prompt)
    else:
        ids = body.prompt
        if not all(0 <= i < tokenizer.vocab_size for i in ids):
            raise OpenAIError(400, f"token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    if not ids:
        raise OpenAIError(400, "the prompt is empty", param="prompt")
    if body.echo and body.logprobs is not None:
        raise OpenAIError(400, "echo together with logprobs is not supported (prompt logprobs are not "
                          "computed)", param="echo")
    check_n(request, body.n)
    params = generation_params(settings, body, len(ids), "prompt", tokenizer.vocab_size)
    echo = (body.prompt if isinstance(body.prompt, str) else tokenizer.decode(ids)) if body.echo else ""
    meta = Meta("cmpl", settings.model_id)
    events = run(request, ids, params)
    logprobs = [Logprobs(tokenizer, body.logprobs is not None) for _ in range(body.n)]
    if body.stream:
        return sse(completion_chunks(events, meta, body.include_usage, logprobs, echo))
    texts, choices, done = [[echo] for _ in range(body.n)], [None] * body.n, []
    async for event in events:
        if isinstance(event, Piece):
            logprobs[event.index].add(event)
            texts[event.index].append(event.text)
        elif isinstance(event, Finished):
            i = event.index
            choices[i] = {"index": i, "text": "".join(texts[i]), "finish_reason": event.finish_reason,
                          "logprobs": logprobs[i].completion(len(echo))}
            done.append(event)
            if len(done) == body.n:
                return meta.body("text_completion", choices, usage(done))
        elif isinstance(event, Failed):
            raise OpenAIError(500, event.message, type="server_error")
    return client_gone()
