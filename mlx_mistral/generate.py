"""The Python API over the engine: generate, stream_generate, chat, chat_completion.

Each call builds one `Request` and runs it as a batch of one on an engine of its own; the
server and the CLI go through the same engine (engine/), so all of them generate alike.
"""

from __future__ import annotations

from typing import Any, Generator, Optional, Union

import mlx.core as mx

from .budget import fit_to_budget
from .cache import ConversationCache, KVSettings
from .constrain import Limits, ToolChoice, check_constraints
from .distributed.lockstep import engine_for
from .engine import Constraint, Request, Response, Speculation
from .engine.steps import DEFAULT_PREFILL_STEP, generate_step, generation_stream, prefill  # noqa: F401
from .errors import MistralError
from .sampling import LogitsProcessor, SamplingParams
from .tools import ToolCallStream, call_marker, parse_reply, validate_request

Prompt = Union[str, list[int], list[dict]]


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


def build_request(tokenizer, prompt: Prompt, *, max_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                  repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                  stop: Optional[Union[str, list[str]]] = None, system: Optional[str] = None,
                  tools: Optional[list[dict]] = None, tool_choice: ToolChoice = "auto",
                  response_format: Optional[dict] = None, parallel_tool_calls: bool = True,
                  limits: Optional[Limits] = None, logits_processors: Optional[list[LogitsProcessor]] = None,
                  ignore_eos: bool = False, kv_bits: Optional[int] = None, kv_group_size: int = 64,
                  max_kv_size: Optional[int] = None, speculate: Optional[str] = None,
                  num_draft: Optional[int] = None, draft_model=None, **more: Any) -> Request:
    """The `Request` for `stream_generate`'s keywords (`more`: Request fields such as logprobs
    or n, and SamplingParams fields such as presence_penalty or logit_bias)."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        validate_request(list(prompt), tools)
    elif tools:
        validate_request([], tools)
    sampling_more = {k: more.pop(k) for k in ("presence_penalty", "frequency_penalty", "logit_bias") if k in more}
    sampling = SamplingParams(temperature, top_p, top_k, min_p, seed, repetition_penalty, **sampling_more)
    check_constraints(tools, response_format)  # a schema no value satisfies, before any sizing
    # a forced call is sized to finish within max_tokens (or refused when it cannot)
    limits = fit_to_budget(tokenizer, tools, tool_choice, limits or Limits(), max_tokens)
    constraint = Constraint(tools, tool_choice, response_format, parallel_tool_calls, limits)
    return Request(tuple(encode_prompt(tokenizer, prompt, system=system, tools=tools)), max_tokens, sampling,
                   stop or (), ignore_eos, constraint, tuple(logits_processors or ()),
                   KVSettings(kv_bits, kv_group_size, max_kv_size), Speculation(speculate, num_draft, draft_model),
                   **more)


def stream_generate(model, tokenizer, prompt: Prompt, *,
                    prompt_cache: Optional[Union[list, ConversationCache]] = None,
                    prefill_step_size: int = DEFAULT_PREFILL_STEP, **kwargs: Any) -> Generator[Response, None, None]:
    """Stream a reply as `Response`s; the last one carries `finish_reason`.

    Keywords: `max_tokens`, sampling (`temperature`, `top_p`, `top_k`, `min_p`,
    `repetition_penalty`, `seed`), `stop`, `system`, `ignore_eos`, `logits_processors`, the KV
    options (`kv_bits`, `kv_group_size`, `max_kv_size`) and speculation (`speculate`,
    `num_draft`, `draft_model`). `tools` (OpenAI function definitions), `tool_choice` ("auto",
    "none", "required", or a function by name or as {"type": "function", "function": {"name":
    ...}}) and `response_format` ({"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"schema": ...}}) constrain the reply with a grammar, so a tool call or JSON
    reply is always well-formed and valid (within `limits`, the bounds put on values a schema
    leaves unbounded); `chat_completion` turns the ids into tool calls.

    `prompt_cache` is a per-layer cache list (used as is) or a `ConversationCache`, which
    computes only the ids after its longest common prefix with this prompt and then holds the
    new sequence (`Response.cached_tokens` says how many prompt ids it reused). The kv options
    shape a fresh cache; a given ConversationCache must have been made with the same ones.
    """
    request = build_request(tokenizer, prompt, **kwargs)
    engine = engine_for(model, tokenizer, max_batch=request.n, prefill_chunk=prefill_step_size)
    mx.reset_peak_memory()
    yield from engine.responses(engine.submit(request, prompt_cache))


def engine_generate_step(prompt: mx.array, model, *, max_tokens: int = 256,
                         prefill_step_size: int = DEFAULT_PREFILL_STEP, **_: Any):
    """`generate_step`'s shape (yields (token id, None)) through the engine: greedy, end of
    sequence ignored, as `bench` measures it (a sharded model: every rank steps it in lockstep)."""
    engine = engine_for(model, None, max_batch=1, prefill_chunk=prefill_step_size)
    request = Request(tuple(prompt.tolist()), max_tokens, ignore_eos=True)
    for r in engine.responses(engine.submit(request)):
        if r.token is not None:
            yield r.token, None


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
    finish = "tool_calls" if calls.calls and not calls.cut else last.finish_reason
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
