"""Generation as a stack of generators: generate_step -> stream_generate -> generate / chat."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Optional, Union

import mlx.core as mx

from .cache import make_cache
from .errors import MistralError
from .sampling import LogitsProcessor, Sampler, processors_from, sampler_from

Prompt = Union[str, list[int], list[dict]]

# Prefill chunk: bounds the (heads x chunk x context) attention scores held at once.
DEFAULT_PREFILL_STEP = 2048

generation_stream = mx.new_stream(mx.default_device())


def prefill(model, tokens: mx.array, cache: list, step_size: int = DEFAULT_PREFILL_STEP,
            progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Run `tokens` (1-D) through the model in chunks, filling `cache`; returns nothing."""
    total = tokens.size
    for start in range(0, total, step_size):
        chunk = tokens[start : start + step_size]
        model(chunk[None], cache=cache)
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
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token id, log-probabilities) pairs; the next step is queued before each yield.

    `prompt` holds the ids not yet in `prompt_cache` (all of them for a fresh cache); it must
    hold at least one id, whose logits give the first token.
    """
    if prompt.size == 0:
        raise MistralError("the prompt is empty: nothing to continue from")
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    history = [prompt]  # ids the logits processors look back over

    def decode_one_token(ids: mx.array, new: bool = True) -> tuple[mx.array, mx.array]:
        logits = model(ids[None], cache=cache)[:, -1, :]  # (1, vocab)
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
    prompt_cache: Optional[list] = None,
    logits_processors: Optional[list[LogitsProcessor]] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    ignore_eos: bool = False,
    speculate: Optional[str] = None,
    num_draft: Optional[int] = None,
    draft_model=None,
) -> Generator[Response, None, None]:
    """Stream a reply as `Response`s; the last one carries `finish_reason`."""
    ids = encode_prompt(tokenizer, prompt, system=system, tools=tools)
    if max_tokens < 1:
        raise MistralError("max_tokens must be at least 1")
    try:
        sampler = sampler_from(temperature, top_p, top_k, min_p)
        processors = processors_from(repetition_penalty) + list(logits_processors or [])
    except ValueError as e:
        raise MistralError(str(e)) from e
    if seed is not None:
        mx.random.seed(seed)
    stops = _StopMatcher([stop] if isinstance(stop, str) else (stop or []))
    detok = tokenizer.detokenizer()
    eos = set() if ignore_eos else tokenizer.eos_token_ids
    from .speculate import SpeculationStats, select_step  # imports this module

    spec = SpeculationStats()
    step = select_step(speculate, model, num_draft=num_draft, draft_model=draft_model, stats=spec)

    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    finish_reason = "length"
    steps = step(
        mx.array(ids, dtype=mx.int32), model, max_tokens=max_tokens, sampler=sampler,
        logits_processors=processors or None, prompt_cache=prompt_cache,
        prefill_step_size=prefill_step_size,
    )

    def response(text, token, reason):
        elapsed = time.perf_counter() - tic
        return Response(text, token, reason, len(ids), prompt_tps, n,
                        n / elapsed if elapsed > 0 else 0.0, mx.get_peak_memory() / 1e9,
                        spec if spec.mode != "none" else None)

    hit_stop = False
    for token, _ in steps:
        if n == 0:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
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


def chat(model, tokenizer, messages: list[dict], *, tools: Optional[list[dict]] = None,
         **kwargs: Any) -> dict:
    """One assistant turn in OpenAI message shape: {"role": "assistant", "content": ...}."""
    text = generate(model, tokenizer, messages, tools=tools, **kwargs)
    return {"role": "assistant", "content": text}
