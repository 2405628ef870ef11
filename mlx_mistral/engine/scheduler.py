"""The engine: requests in, batched steps, streams out.

Split as vLLM splits it: `_schedule` decides who runs this step (admission in arrival order up
to `max_batch` sequences; every prefilling sequence advances one chunk), the backend runs the
model (one batched forward for all decoding rows), and each `Sequence` samples, applies its own
grammar mask and stop criteria, and streams. Only the thread calling `step()` touches MLX;
`submit` and `Stream.cancel` may be called from any thread.

Decode rows are batched because decoding is bandwidth-bound: a GEMV over 8 rows reads each
weight once, so a step over 8 sequences costs little more than a step over one. A newcomer's
prompt is prefilled in chunks between decode steps, so running streams keep flowing.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterator, Optional, Union

import mlx.core as mx

from ..cache import ConversationCache
from ..errors import MistralError
from .backend import backend_for
from .prefix import PrefixPool, fork
from .request import Request
from .sequence import Response, Sequence, Stream
from .speculate import SpeculationStats, select_step
from .steps import generation_stream

DEFAULT_MAX_BATCH = 8  # a CPU GEMV reads each weight once for up to 8 rows (kernels/cpu_qmm.c)
DEFAULT_PREFILL_CHUNK = 512  # prompt ids per sequence per step: bounds the wait of running streams
CLEAR_EVERY = 256  # steps between releases of MLX's buffer cache


class Engine:
    """Owns the model's forward passes; serves submitted requests in batched steps."""

    def __init__(self, model, tokenizer, *, max_batch: int = DEFAULT_MAX_BATCH,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefix_cache: int = 0, backend=None):
        if max_batch < 1:
            raise MistralError(f"max_batch must be at least 1, not {max_batch}")
        if prefill_chunk < 1:
            raise MistralError(f"prefill_chunk must be at least 1, not {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.backend = backend or backend_for(model)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.pool = PrefixPool(model, prefix_cache)  # conversations kept for prefix reuse
        self.waiting: deque[tuple[Stream, object]] = deque()
        self.active: list[Sequence] = []
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.siblings: dict[int, list[Sequence]] = {}  # n > 1: replies waiting for the first's prefill
        self.steps = 0

    # -- admission ------------------------------------------------------------------------------

    def submit(self, request: Request, cache: Union[None, list, ConversationCache] = None) -> Stream:
        """Queue `request`; its responses arrive on the returned stream. `cache` is a per-layer
        cache list (used as is, the prompt's ids all new to it) or a ConversationCache (its
        common prefix with the prompt is reused); by default the engine's pool provides one."""
        self.check(request, cache)
        stream = Stream(request)
        with self.wake:
            self.waiting.append((stream, cache))
            self.wake.notify()
        return stream

    def check(self, request: Request, cache: Union[None, list, ConversationCache] = None) -> None:
        """Refuses, with one line, a request this engine cannot run (submit calls it)."""
        args = self.model.args
        request.check_fits(args.vocab_size, args.max_position_embeddings)
        request.kv.check(args.head_dim)
        if request.n > self.max_batch:
            raise MistralError(f"n={request.n} is more than this engine's batch of {self.max_batch}")
        if request.n > 1 and cache is not None:
            raise MistralError("n > 1 replies cannot share one caller's cache")
        if isinstance(cache, ConversationCache) and cache.settings != request.kv and (
                request.kv.kv_bits or request.kv.max_kv_size):
            raise MistralError(f"the prompt cache holds {cache.settings.describe()}, "
                               f"not the {request.kv.describe()} asked for")
        self._speculation_step(request)  # refuses a bad mode or draft model now, not mid-stream

    def _admit(self) -> None:
        with self.lock:
            while self.waiting and len(self.active) + self.waiting[0][0].request.n <= self.max_batch:
                stream, cache = self.waiting.popleft()
                if stream.cancelled:
                    stream.open = 0
                    continue
                try:
                    self._start(stream, cache)
                except Exception as e:  # noqa: BLE001  (its grammar cannot be built: it alone fails)
                    stream.error = e

    def _start(self, stream: Stream, given: Union[None, list, ConversationCache]) -> None:
        """The request's first reply takes a cache; its n - 1 siblings wait for its prefill."""
        request = stream.request
        max_tokens = request.room(self.model.args.max_position_embeddings)
        conversation, cache, cached = self._cache_for(request, given)
        first = Sequence(stream, 0, self.tokenizer, conversation, cache, cached, max_tokens)
        self._speculate(first)
        self.active.append(first)
        if request.n > 1:
            self.siblings[id(first)] = [Sequence(stream, i, self.tokenizer, None, None, len(request.prompt) - 1,
                                                 max_tokens) for i in range(1, request.n)]

    def _release_siblings(self, first: Sequence) -> None:
        """`first` has its prompt in its cache: each sibling decodes from a copy of it."""
        for seq in self.siblings.pop(id(first), []):
            seq.cache, seq.cached = fork(first.cache), first.cached
            self.active.append(seq)

    def _cache_for(self, request: Request, given) -> tuple[Optional[ConversationCache], list, int]:
        if isinstance(given, ConversationCache):
            return given, given.cache, given.reuse(request.prompt)
        if given is not None:
            return None, given, 0
        conversation = self.pool.take(request.prompt, request.kv)
        return conversation, conversation.cache, conversation.reuse(request.prompt)

    def _speculation_step(self, request: Request, stats: Optional[SpeculationStats] = None):
        """The speculative step function a request asks for, or None to decode in the batch."""
        spec = request.speculation
        stats = stats if stats is not None else SpeculationStats()
        step = select_step(spec.mode, self.model, num_draft=spec.num_draft, draft_model=spec.draft_model,
                           stats=stats)
        if stats.mode == "none":
            return None
        if request.kv.max_kv_size:
            raise MistralError("speculative decoding rolls the cache back, which a rotating cache "
                               "(max_kv_size) cannot do: drop one of them")
        return step

    def _speculate(self, seq: Sequence) -> None:
        """A speculating reply runs its own draft-and-verify passes beside the batch."""
        stats = SpeculationStats()
        step = self._speculation_step(seq.request, stats)
        if step is None:
            return
        processors = seq.processors or None
        ids = mx.array(seq.prompt[seq.cached:], dtype=mx.int32)
        seq.speculation = stats
        seq.speculative = step(ids, self.model, max_tokens=seq.max_tokens, sampler=seq.sampler,
                               logits_processors=processors, prompt_cache=seq.cache,
                               prefill_step_size=self.prefill_chunk)
        seq.pending = []

    # -- one step ---------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    def step(self) -> None:
        """Admit, advance every prefill by a chunk, decode one token for every other reply."""
        with mx.stream(generation_stream):
            self._drop_cancelled()
            self._retire()  # before admission: a cancelled reply's slot is free this step
            self._admit()
            prefilling = [s for s in self.active if s.prefilling]
            speculating = [s for s in self.active if s.speculative is not None and not s.finished]
            chunks = self._chunks(prefilling)
            logits, decoding = None, []
            # the prompt chunks and the decode rows in one forward, unless a reply whose prompt is
            # in (now, or already when admitted) has n > 1 siblings: they fork its cache between
            # its prefill and its first decode
            if chunks and not any(id(s) in self.siblings and not s.prefilling for s in self.active):
                decoding = self._decoding()
                logits = self.backend.prefill_and_decode(chunks, [s.y for s in decoding], [s.cache for s in decoding])
            elif chunks:
                self.backend.prefill(chunks)
            for seq in [s for s in self.active if id(s) in self.siblings and not s.prefilling]:
                self._release_siblings(seq)
            for seq in speculating:
                self._speculative_token(seq)
            if logits is None:
                decoding = self._decoding()
            if decoding:
                self._decode(decoding, logits)
        self._retire()
        self.steps += 1
        if self.steps % CLEAR_EVERY == 0:
            mx.clear_cache()

    def _decoding(self) -> list[Sequence]:
        return [s for s in self.active if not s.prefilling and s.speculative is None and not s.finished]

    def _drop_cancelled(self) -> None:
        for seq in self.active:
            if seq.stream.cancelled and not seq.finished:
                seq.finish("cancelled", flush=False)

    def _chunks(self, seqs: list[Sequence]) -> list[tuple[list[int], list]]:
        """The next prompt chunk of every prefilling reply, with its cache (taken off `pending`)."""
        chunks = []
        for seq in seqs:
            chunk, seq.pending = seq.pending[: self.prefill_chunk], seq.pending[self.prefill_chunk:]
            chunks.append((chunk, seq.cache))
        return chunks

    def _speculative_token(self, seq: Sequence) -> None:
        try:
            token, logprobs = next(seq.speculative)
        except StopIteration:
            return seq.finish("length")
        except Exception as e:  # noqa: BLE001  (its drafter, grammar or processor: it alone fails)
            return seq.fail(e)
        seq.accept(token, logprobs)

    def _decode(self, rows: list[Sequence], logits: Optional[mx.array] = None) -> None:
        """One forward pass for every decoding reply (unless the prefill's pass gave its `logits`),
        then each samples its own row."""
        if logits is None:
            logits = self.backend.decode([s.y for s in rows], [s.cache for s in rows])  # (B, vocab)
        plain = [i for i, s in enumerate(rows) if s.plain]
        sampled: list[Optional[mx.array]] = [None] * len(rows)
        logprobs: list[Optional[mx.array]] = [None] * len(rows)
        if plain:
            picks = mx.argmax(logits[mx.array(plain)], axis=-1)  # (P,)
            for j, i in enumerate(plain):
                sampled[i] = picks[j]
        for i, seq in enumerate(rows):
            if sampled[i] is None:
                try:
                    sampled[i], logprobs[i] = seq.sample(logits[i : i + 1])
                except Exception as e:  # noqa: BLE001  (one reply's grammar or processor: it alone fails)
                    seq.fail(e)
        failed = [seq.finished for seq in rows]  # its sampling raised: it failed above
        # a failed row's placeholder reads the logits too: every copy of a sharded engine must
        # run the forward (and its collectives) whichever of its rows failed
        ids = [(mx.argmax(logits[i]) if t is None else t.reshape(())).astype(mx.uint32) for i, t in enumerate(sampled)]
        tokens, failed = self._agree(mx.stack(ids), failed)  # (B,)
        mx.eval(tokens, *[lp for lp in logprobs if lp is not None])
        for seq, token, lp, bad in zip(rows, tokens.tolist(), logprobs, failed):
            if seq.finished:
                continue
            if bad:  # a sharded engine's reply whose sampling failed on another rank
                seq.fail(MistralError("this reply failed on another rank of the sharded model"))
                continue
            seq.accept(token, lp)

    def _agree(self, tokens: mx.array, failed: list[bool]) -> tuple[mx.array, list[bool]]:
        """The ids every copy of this engine takes, and which replies failed on any copy (a
        sharded engine: rank 0's ids, every rank's failures; distributed/)."""
        return tokens, failed

    def _retire(self) -> None:
        done = [s for s in self.active if s.finished]
        if not done:
            return
        self.active = [s for s in self.active if not s.finished]
        for seq in done:
            for sibling in self.siblings.pop(id(seq), []):  # ended before its prefill did
                sibling.finish(seq.finish_reason, flush=False)
            if seq.conversation is not None and seq.conversation in self.pool.lent:
                self.pool.give(seq.conversation)

    # -- driving it ------------------------------------------------------------------------------

    def responses(self, stream: Stream) -> Iterator[Response]:
        """Step the engine from this thread until `stream` ends, yielding its responses. Closing
        the iterator early cancels the request (its cache keeps what was computed)."""
        try:
            while True:
                while stream.events:
                    yield stream.events.popleft()
                if stream.error is not None:
                    raise stream.error
                if stream.done:
                    return
                self.step()
        finally:
            if not stream.done:
                stream.cancel()
                self.step()

    def reset(self) -> None:
        """Drop every request, running or waiting, and every kept conversation (after a failed
        step, when no cache can be trusted)."""
        with self.lock:
            self.waiting.clear()
        self.active.clear()
        self.siblings.clear()
        self.pool.reset()

    def stop_waiting(self) -> None:
        with self.wake:
            self.wake.notify_all()
