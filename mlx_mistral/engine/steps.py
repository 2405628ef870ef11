"""One sequence, step by step: prefill in chunks, then one token per forward pass.

`generate_step` is the plain single-sequence generator (mlx-lm's shape: it yields (token id,
log-probabilities) and queues the next step before each yield). The engine does not use it for
batched work; the benchmarks and the speculative loop's baseline do, and so can anyone who
wants one sequence without the engine's bookkeeping.
"""

from __future__ import annotations

from typing import Callable, Generator, Optional

import mlx.core as mx

from ..cache import KVSettings
from ..errors import MistralError
from ..sampling import LogitsProcessor, Sampler
from .backend import backend_for

# Prefill chunk: bounds the (heads x chunk x context) attention scores held at once.
DEFAULT_PREFILL_STEP = 2048

# thread-local: the server runs generation in a worker thread, and MLX streams belong to one thread
generation_stream = mx.new_thread_local_stream(mx.default_device())


def prefill(model, tokens: mx.array, cache: list, step_size: int = DEFAULT_PREFILL_STEP,
            progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Run `tokens` (1-D) through the model in chunks, filling `cache`; returns nothing."""
    run = backend_for(model)
    total = tokens.size
    for start in range(0, total, step_size):
        run(tokens[start : start + step_size][None], cache)
        mx.eval([c.state for c in cache])
        if progress:
            progress(min(start + step_size, total), total)
    mx.clear_cache()


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


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
    is made with the kv options (mlx-lm's keywords)."""
    if prompt.size == 0:
        raise MistralError("the prompt is empty: nothing to continue from")
    run = backend_for(model)
    if prompt_cache is None:
        prompt_cache = run.make_cache(KVSettings(kv_bits, kv_group_size, max_kv_size).check(model.args.head_dim))
    cache = prompt_cache
    history = [prompt]  # ids the logits processors look back over

    def decode_one_token(ids: mx.array, new: bool = True) -> tuple[mx.array, mx.array]:
        logits = run(ids[None], cache)[:, -1, :]  # (1, vocab)
        if logits_processors:
            if new:
                history[0] = mx.concatenate([history[0], ids])
            for processor in logits_processors:
                logits = processor(history[0], logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        # greedy picks from the logits themselves: the log-probabilities stay a lazy graph that
        # only a caller who reads them evaluates (on the CPU, ~1 ms a token over a 49k vocab)
        y = sampler(logprobs) if sampler is not None else greedy(logits)
        return y, logprobs.squeeze(0)

    with mx.stream(generation_stream):
        # everything but the last prompt id goes through prefill; the last gives the logits
        prefill(model, prompt[:-1], cache, prefill_step_size, progress)
        y, logprobs = decode_one_token(prompt[-1:], new=False)
        mx.async_eval(y)
        for n in range(max_tokens):
            if n + 1 < max_tokens:
                next_y, next_logprobs = decode_one_token(y)
                mx.async_eval(next_y)
            yield y.item(), logprobs
            if n % 256 == 255:
                mx.clear_cache()
            if n + 1 < max_tokens:
                y, logprobs = next_y, next_logprobs
