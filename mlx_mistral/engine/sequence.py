"""One reply being generated: its cache, its sampler and processors, its text and its end.

The engine decides when a sequence runs; the sequence turns each sampled id into a `Response`
(text since the last one, stop strings held back until they can be ruled out) and knows when it
is finished. Every piece of per-request state lives here, so sequences in one batch share
nothing but the model.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import mlx.core as mx

from ..cache import ConversationCache
from ..constrain import make_processor
from .request import Request


@dataclass
class Response:
    """One streamed piece of a reply."""

    text: str  # new text since the previous response (may be empty)
    token: Optional[int]  # the id this response adds, None for the final flush
    finish_reason: Optional[str]  # "stop", "length", "cancelled" or None while generating
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    cached_tokens: int = 0  # prompt ids whose K/V came from a ConversationCache
    speculation: Any = None  # SpeculationStats while speculative decoding is on
    logprob: Optional[float] = None  # log-probability of `token` (when the request asked)
    top_logprobs: Optional[list[tuple[int, float]]] = None  # the most likely ids at this step
    index: int = 0  # which of the request's n replies


class StopMatcher:
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


class _NoText:
    """The detokenizer of an engine without a tokenizer (benchmarks feed and read ids only)."""

    def add_token(self, token: int) -> str:
        return ""

    def finalize(self) -> str:
        return ""


class Stream:
    """What a caller holds for a submitted request: its responses, in order, and a way to stop it.

    `cancel()` may be called from any thread; the engine ends the request at its next step."""

    def __init__(self, request: Request):
        self.request = request
        self.events: deque[Response] = deque()
        self.cancelled = False
        self.open = request.n  # replies not finished yet
        self.error: Optional[BaseException] = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.open == 0 or self.error is not None

    def put(self, response: Response) -> None:
        self.events.append(response)
        if response.finish_reason is not None:
            self.open -= 1


class Sequence:
    """The state of one reply between engine steps."""

    def __init__(self, stream: Stream, index: int, tokenizer, conversation: Optional[ConversationCache],
                 cache: list, cached: int, max_tokens: int):
        request = stream.request
        self.stream, self.index, self.request = stream, index, request
        self.conversation, self.cache, self.cached = conversation, cache, cached
        self.max_tokens = max_tokens
        self.prompt = list(request.prompt)
        self.pending = self.prompt[cached:-1]  # ids still to prefill; the last one is decoded
        self.y = self.prompt[-1]  # the next id to feed, whose logits give the next token
        self.sampler = request.sampling.sampler(index)
        self.processors = request.sampling.processors() + list(request.logits_processors)
        constraint = make_processor(tokenizer, **request.constraint.kwargs())
        if constraint is not None:  # last, so no later processor can re-allow a masked token
            self.processors.append(constraint)
        self.history = mx.array(self.prompt, dtype=mx.int32)  # what the processors look back over
        self.detok = tokenizer.detokenizer() if tokenizer is not None else _NoText()
        self.stops = StopMatcher(request.stop)
        self.eos = set() if request.ignore_eos or tokenizer is None else set(tokenizer.eos_token_ids)
        self.generated: list[int] = []
        self.finish_reason: Optional[str] = None
        self.speculative = None  # the speculative loop's generator when this reply speculates
        self.speculation = None  # its SpeculationStats
        self.started = time.perf_counter()
        self.first_at: Optional[float] = None
        self.prompt_tps = 0.0

    @property
    def prefilling(self) -> bool:
        return bool(self.pending)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def plain(self) -> bool:
        """Greedy with nothing to apply: its row is an argmax in a batched op."""
        return self.request.sampling.greedy and not self.processors and self.request.logprobs is None

    def sample(self, logits: mx.array) -> tuple[mx.array, Optional[mx.array]]:
        """(1, vocab) logits of the fed id -> the sampled id (1,) and the log-probabilities."""
        if self.generated:  # the processors see every id fed so far
            self.history = mx.concatenate([self.history, mx.array([self.y], dtype=mx.int32)])
        for processor in self.processors:
            logits = processor(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs), logprobs

    def _response(self, text: str, token: Optional[int], finish: Optional[str],
                  logprobs: Optional[mx.array] = None) -> Response:
        now = time.perf_counter()
        n = len(self.generated)
        elapsed = now - (self.first_at or now)
        logprob = top = None
        if logprobs is not None and token is not None and self.request.logprobs is not None:
            row = logprobs.reshape(-1)
            logprob = row[token].item()
            k = self.request.logprobs
            if k:
                ids = mx.argpartition(-row, k - 1)[:k]
                values = row[ids].tolist()
                top = sorted(zip(ids.tolist(), values), key=lambda p: -p[1])
        return Response(text, token, finish, len(self.prompt), self.prompt_tps, n, n / elapsed if elapsed > 0 else 0.0,
                        mx.get_peak_memory() / 1e9, self.cached, self.speculation, logprob, top, self.index)

    def accept(self, token: int, logprobs: Optional[mx.array] = None) -> None:
        """Take the sampled id: stream its text, or end the reply (EOS, a stop string, the budget)."""
        if self.first_at is None:
            self.first_at = time.perf_counter()
            self.prompt_tps = (len(self.prompt) - self.cached) / max(self.first_at - self.started, 1e-9)
        self.generated.append(token)
        self.y = token
        if token in self.eos:
            return self.finish("stop")
        text, hit_stop = self.stops.feed(self.detok.add_token(token))
        self.stream.put(self._response(text, token, None, logprobs))
        if hit_stop:
            self.finish("stop", flush=False)
        elif len(self.generated) >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str, flush: bool = True) -> None:
        """The last response: what the detokenizer and the stop matcher still held."""
        tail = ""
        if flush:
            tail, hit_stop = self.stops.feed(self.detok.finalize())
            if not hit_stop:
                tail += self.stops.flush()
        self.finish_reason = reason
        if self.speculative is not None:
            self.speculative.close()  # rolls the cache back to what was yielded
        if self.conversation is not None:  # it now holds the prompt and the fed ids
            self.conversation.record(self.prompt + self.generated)
        self.stream.put(self._response(tail, None, reason))
