"""The generation worker of the server: one thread owns the model and serves jobs in arrival order.

MLX is not re-entrant, so every model call happens on this one thread; HTTP handlers on the
event loop submit a `Job` and receive its events through `Job.emit`. Between jobs the worker
keeps the KV of the last sequence it served (`PrefixCache`): a follow-up turn of the same
conversation starts with that sequence, so only its new tokens are run through the model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx

from .cache import can_trim_prompt_cache, make_cache, trim_prompt_cache
from .generate import Response, stream_generate
from .server_metrics import Metrics

log = logging.getLogger("mlx_mistral.server")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """The KV cache of the last sequence served and the ids it holds.

    `take` hands out a cache already holding the longest common prefix of those ids and the
    new prompt (trimming the rest), or a fresh one; `store` puts it back after the job.
    """

    def __init__(self, model, enabled: bool = True):
        self.model = model
        self.enabled = enabled
        self.ids: list[int] = []  # exactly the ids whose keys and values `cache` holds
        self.cache: Optional[list] = None

    def take(self, ids: list[int]) -> tuple[list, int]:
        """(cache, n): the cache holds `ids[:n]`; the caller owns it until `store`."""
        cache, self.cache = self.cache, None
        if cache is not None:
            n = min(common_prefix(self.ids, ids), len(ids) - 1)  # the last id must run: its logits start the reply
            surplus = len(self.ids) - n
            if n > 0 and (surplus == 0 or can_trim_prompt_cache(cache)):
                trim_prompt_cache(cache, surplus)
                return cache, n
        return make_cache(self.model), 0

    def store(self, ids: list[int], cache: Optional[list]) -> None:
        """Keep `cache` for the next job; `ids` are the ids it was fed (it may hold fewer, or
        one more: an end-of-sequence id that ended the reply)."""
        self.ids, self.cache = [], None
        if not self.enabled or cache is None:
            return
        offsets = {c.offset for c in cache}
        if len(offsets) != 1:  # a layer was left half-updated by an error: not reusable
            return
        offset = offsets.pop()
        if offset > len(ids):
            if not can_trim_prompt_cache(cache):
                return
            trim_prompt_cache(cache, offset - len(ids))
            offset = len(ids)
        self.ids, self.cache = list(ids[:offset]), cache


@dataclass
class Finished:
    """The last event of a job that ran to its end."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    """The last event of a job that broke; `message` is for the client."""

    message: str


@dataclass
class Job:
    ids: list[int]  # the whole prompt
    params: dict[str, Any]  # stream_generate keyword arguments (sampling, stop, max_tokens, tools and formats)
    emit: Callable[[object], None]  # delivers a Response, Finished or Failed to the requester
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Owns the model; serves submitted jobs one at a time, first come first served."""

    def __init__(self, model, tokenizer, metrics: Metrics, prefix_cache: bool = True):
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.prefix = PrefixCache(model, enabled=prefix_cache)
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue()
        # held while a job runs: whoever else needs the model in this process waits on it
        self.lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="mlx-mistral-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Serve what is queued, then end the worker."""
        if self._thread is not None:
            self.jobs.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        self.metrics.queue_depth.inc()
        self.jobs.put(job)

    def _work(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                self.metrics.queue_depth.dec()
                if job.cancelled.is_set():  # its client left while it waited
                    self.metrics.cancelled.inc()
                    continue
                with self.lock:
                    self.metrics.running.inc()
                    try:
                        self._serve(job)
                    # the worker must outlive any one request's failure, or the server hangs
                    except Exception as e:  # noqa: BLE001
                        log.exception("generation failed")
                        self.prefix.store([], None)
                        job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
                    finally:
                        self.metrics.running.dec()
        finally:
            mx.clear_streams()  # MLX needs each thread's streams released before the process exits

    def _serve(self, job: Job) -> None:
        cache, cached = self.prefix.take(job.ids)
        generated: list[int] = []
        first_at = None
        last: Optional[Response] = None
        steps = stream_generate(self.model, self.tokenizer, job.ids[cached:], prompt_cache=cache, **job.params)
        try:
            for last in steps:
                if job.cancelled.is_set():
                    self.metrics.cancelled.inc()
                    break
                if last.token is not None:
                    generated.append(last.token)
                    if first_at is None:
                        first_at = time.perf_counter()
                        self.metrics.ttft.observe(first_at - job.queued_at)
                job.emit(last)
        finally:
            steps.close()
            self.prefix.store(job.ids + generated, cache)
        self.metrics.prompt_tokens.inc(len(job.ids))
        self.metrics.cached_tokens.inc(cached)
        if last is None or last.finish_reason is None:  # cancelled
            self.metrics.completion_tokens.inc(len(generated))
            return
        self.metrics.completion_tokens.inc(last.generation_tokens)
        if last.generation_tokens > 1:
            self.metrics.decode_tps.observe(last.generation_tps)
        job.emit(Finished(last.finish_reason, len(job.ids), last.generation_tokens, cached))
