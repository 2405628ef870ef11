"""Generation as a stack of generators: generate_step -> stream_generate -> generate / chat."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Optional, Union

import mlx.core as mx

from .cache import ConversationCache, KVSettings, make_cache
from .engine.backend import backend_for
from .constrain import Limits, ToolChoice, make_processor
from .errors import MistralError
from .sampling import LogitsProcessor, Sampler, processors_from, sampler_from
from .tools import ToolCallStream, call_marker, parse_reply, validate_request

Prompt = Union[str, list[int], list[dict]]

# Prefill chunk: bounds the (heads x chunk x context) attention scores held at once.
DEFAULT_PREFILL_STEP = 2048

# thread-local: the server runs generation in a worker thread, and MLX streams belong to one thread
generation_stream = mx.new_thread_local_stream(mx.default_device())


def prefill(model, tokens: mx.array, cache: list, step_size: int = DEFAULT_PREFILL_STEP,
            progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Run `tokens` (1-D) through the model in chunks, filling `cache`; returns nothing."""
    total = tokens.size
    runner = backend_for(model)
    for start in range(0, total, step_size):
        chunk = tokens[start : start + step_size]
        runner(chunk[None], cache=cache)
        mx.eval([c.state for c in cache])
        if progress:
            progress(min(start + step_size, total), total)
    mx.clear_cache()


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[list[LogitsProcessor]] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    progress: Optional[Callable[[int, int], None]] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    max_kv_size: Optional[int] = None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token id, log-probabilities) pairs; the next step is queued before each yield.

    `prompt` holds the ids not yet in `prompt_cache` (all of them for a fresh cache); it must
    hold at least one id, whose logits give the first token. Without `prompt_cache`, a cache
    is made with the kv options (see `cache.make_cache`).
    """
    if prompt.size == 0:
        raise MistralError("the prompt is empty: nothing to continue from")
    if prompt_cache is None:
        prompt_cache = make_cache(model, kv_bits=kv_bits, kv_group_size=kv_group_size, max_kv_size=max_kv_size)
    cache = prompt_cache
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    history = [prompt]  # ids the logits processors look back over
    runner = backend_for(model)

    def decode_one_token(ids: mx.array, new: bool = True) -> tuple[mx.array, mx.array]:
        logits = runner(ids[None], cache=cache)[:, -1, :]  # (1, vocab)
        if logits_processors:
            if new:
                history[0] = mx.concatenate([history[0], ids])
            for processor in logits_processors:
                logits = processor(history[0], logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    with mx.stream(generation_stream):
        # everything but the last prompt id goes through prefill; the last gives the logits
        prefill(model, prompt[:-1], cache, prefill_step_size, progress)
        y, logprobs = decode_one_token(prompt[-1:], new=False)
        mx.async_eval(y, logprobs)
        n = 0
        while n < max_tokens:
            if n + 1 < max_tokens:
                next_y, next_logprobs = decode_one_token(y)
                mx.async_eval(next_y, next_logprobs)
            yield y.item(), logprobs
            if n % 256 == 255:
                mx.clear_cache()
            if n + 1 < max_tokens:
                y, logprobs = next_y, next_logprobs
            n += 1


@dataclass
class Response:
    """One streamed piece of a reply."""

    text: str  # new text since the previous response (may be empty)
    token: Optional[int]  # the id this response adds, None for the final flush
    finish_reason: Optional[str]  # "stop", "length" or None while generating
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    cached_tokens: int = 0  # prompt ids whose K/V came from a ConversationCache
    speculation: Any = None  # SpeculationStats while speculative decoding is on


def encode_prompt(tokenizer, prompt: Prompt, *, system: Optional[str] = None,
                  tools: Optional[list[dict]] = None) -> list[int]:
    """Text becomes one user message (after `system`), messages go through the chat format,
    token ids pass through unchanged."""
    if isinstance(prompt, str):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.encode_chat(messages, tools=tools)
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt) and prompt:
        messages = list(prompt)
        if system and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.encode_chat(messages, tools=tools)
    if isinstance(prompt, (list, tuple, mx.array)):
        ids = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
        if ids and all(isinstance(i, int) for i in ids):
            return ids
    raise MistralError("prompt must be text, a non-empty list of token ids, or a list of messages")


class _StopMatcher:
    """Finds stop strings in streamed text, holding back what could still start one."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        hold = 0
        for stop in self.stops:  # longest suffix of pending that is a prefix of a stop
            for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Optional[Union[str, list[str]]] = None,
    system: Optional[str] = None,
    tools: Optional[list[dict]] = None,
    tool_choice: ToolChoice = "auto",
    response_format: Optional[dict] = None,
    parallel_tool_calls: bool = True,
    limits: Optional[Limits] = None,
    prompt_cache: Optional[Union[list, ConversationCache]] = None,
    logits_processors: Optional[list[LogitsProcessor]] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    ignore_eos: bool = False,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    max_kv_size: Optional[int] = None,
    speculate: Optional[str] = None,
    num_draft: Optional[int] = None,
    draft_model=None,
) -> Generator[Response, None, None]:
    """Stream a reply as `Response`s; the last one carries `finish_reason`.

    `tools` (OpenAI function definitions), `tool_choice` ("auto", "none", "required", or a
    function by name or as {"type": "function", "function": {"name": ...}}) and
    `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
    {"schema": ...}}) constrain the reply with a grammar, so a tool call or JSON reply is
    always well-formed and valid (within `limits`, the bounds put on values a schema leaves
    unbounded); `chat_completion` turns the ids into tool calls.

    `prompt_cache` is a per-layer cache list (used as is) or a `ConversationCache`, which
    computes only the ids after its longest common prefix with this prompt and then holds the
    new sequence (`Response.cached_tokens` says how many prompt ids it reused). The kv options
    shape a fresh cache; a given ConversationCache must have been made with the same ones.
    """
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        validate_request(list(prompt), tools)
    elif tools:
        validate_request([], tools)
    ids = encode_prompt(tokenizer, prompt, system=system, tools=tools)
    if max_tokens < 1:
        raise MistralError("max_tokens must be at least 1")
    constraint = make_processor(tokenizer, tools, tool_choice, response_format,
                                parallel_tool_calls=parallel_tool_calls, limits=limits or Limits())
    try:
        sampler = sampler_from(temperature, top_p, top_k, min_p)
        processors = processors_from(repetition_penalty) + list(logits_processors or [])
    except ValueError as e:
        raise MistralError(str(e)) from e
    if constraint is not None:  # last, so no later processor can re-allow a masked token
        processors.append(constraint)
    if seed is not None:
        mx.random.seed(seed)
    stops = _StopMatcher([stop] if isinstance(stop, str) else (stop or []))
    detok = tokenizer.detokenizer()
    eos = set() if ignore_eos else tokenizer.eos_token_ids
    kv = dict(kv_bits=kv_bits, kv_group_size=kv_group_size, max_kv_size=max_kv_size)
    conversation = prompt_cache if isinstance(prompt_cache, ConversationCache) else None
    if conversation is not None and (kv_bits or max_kv_size) and KVSettings(**kv) != conversation.settings:
        raise MistralError(f"the prompt cache holds {conversation.settings.describe()}, "
                           f"not the {KVSettings(**kv).describe()} asked for")
    cached = conversation.reuse(ids) if conversation is not None else 0
    from .speculate import SpeculationStats, select_step  # imports this module

    spec = SpeculationStats()
    step = select_step(speculate, model, num_draft=num_draft, draft_model=draft_model, stats=spec)
    if spec.mode != "none" and max_kv_size:
        raise MistralError("speculative decoding rolls the cache back, which a rotating cache "
                           "(max_kv_size) cannot do: drop one of them")
    cache = conversation.cache if conversation is not None else prompt_cache
    if cache is None:  # made here so every step function (plain or speculative) gets the kv options
        cache = make_cache(model, **kv)

    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    finish_reason = "length"
    steps = step(
        mx.array(ids[cached:], dtype=mx.int32), model, max_tokens=max_tokens, sampler=sampler,
        logits_processors=processors or None, prompt_cache=cache, prefill_step_size=prefill_step_size,
    )
    if conversation is not None:
        steps = conversation.follow(ids, steps)  # records what its cache holds when the steps end

    def response(text, token, reason):
        elapsed = time.perf_counter() - tic
        return Response(text, token, reason, len(ids), prompt_tps, n,
                        n / elapsed if elapsed > 0 else 0.0, mx.get_peak_memory() / 1e9, cached,
                        spec if spec.mode != "none" else None)

    hit_stop = False
    for token, _ in steps:
        if n == 0:
            prompt_tps = (len(ids) - cached) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        n += 1
        if token in eos:
            finish_reason = "stop"
            break
        text, hit_stop = stops.feed(detok.add_token(token))
        yield response(text, token, None)
        if hit_stop:
            finish_reason = "stop"
            break
    steps.close()
    tail = ""
    if not hit_stop:
        tail, hit_stop = stops.feed(detok.finalize())
        if not hit_stop:
            tail += stops.flush()
    yield response(tail, None, finish_reason)


def generate(model, tokenizer, prompt: Prompt, *, verbose: bool = False, **kwargs) -> str:
    """The whole reply as text (see `stream_generate` for the parameters)."""
    pieces = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s")
        print(f"decode: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s")
        print(f"peak memory: {last.peak_memory_gb:.2f} GB")
        if last.speculation is not None:
            print(last.speculation.summary())
    return "".join(pieces)


def _usage(last: Optional[Response]) -> dict:
    prompt, completion = (last.prompt_tokens, last.generation_tokens) if last else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens if last else 0}}


def chat_completion(model, tokenizer, messages: list[dict], **kwargs: Any) -> dict:
    """One assistant turn: {"message": {"role", "content", "tool_calls"?}, "finish_reason":
    "stop" | "length" | "tool_calls", "usage": {"prompt_tokens", "completion_tokens",
    "total_tokens"}}. Takes `stream_generate`'s keywords (tools, tool_choice, response_format,
    sampling)."""
    tokens, last = [], None
    for last in stream_generate(model, tokenizer, messages, **kwargs):
        if last.token is not None:
            tokens.append(last.token)
    message = parse_reply(tokens, tokenizer)
    finish = "tool_calls" if message.get("tool_calls") else last.finish_reason
    return {"message": message, "finish_reason": finish, "usage": _usage(last)}


def stream_chat_completion(model, tokenizer, messages: list[dict],
                           **kwargs: Any) -> Generator[dict, None, None]:
    """OpenAI chat-completion chunks' choice parts: {"delta": {...}, "finish_reason": None}
    while generating ({"role": "assistant"} first, then {"content": text} pieces, then
    {"tool_calls": [...]} pieces), and last {"delta": {}, "finish_reason": ..., "usage": ...,
    "timing": {"prompt_tps", "generation_tps", "peak_memory_gb"}}."""
    calls = ToolCallStream(call_marker(tokenizer))
    steps = stream_generate(model, tokenizer, messages, **kwargs)
    try:
        last = next(steps)  # a bad request raises here, before any chunk is sent
        yield {"delta": {"role": "assistant"}, "finish_reason": None}
        while True:
            for delta in calls.feed(last.token, last.text):
                yield {"delta": delta, "finish_reason": None}
            if last.finish_reason is not None:
                break
            last = next(steps)
    finally:
        steps.close()  # at once, also when the consumer stops early: a prompt cache records its state
    for delta in calls.finish():
        yield {"delta": delta, "finish_reason": None}
    finish = "tool_calls" if calls.calls else last.finish_reason
    timing = {"prompt_tps": last.prompt_tps, "generation_tps": last.generation_tps,
              "peak_memory_gb": last.peak_memory_gb}
    yield {"delta": {}, "finish_reason": finish, "usage": _usage(last), "timing": timing,
           "speculation": last.speculation}


def chat(model, tokenizer, messages: list[dict], *, tools: Optional[list[dict]] = None,
         tool_choice: ToolChoice = "auto", response_format: Optional[dict] = None, **kwargs: Any) -> dict:
    """One assistant turn in OpenAI message shape: {"role": "assistant", "content": str | None,
    "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON}}]?}."""
    return chat_completion(model, tokenizer, messages, tools=tools, tool_choice=tool_choice,
                           response_format=response_format, **kwargs)["message"]
