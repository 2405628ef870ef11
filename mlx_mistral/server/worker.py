"""The generation worker of the server: one thread owns the model and serves jobs in arrival order.

MLX is not re-entrant, so every model call happens on this one thread; HTTP handlers on the
event loop submit a `Job` and receive its events through `Job.emit`. Between jobs the worker
keeps the KV of the last sequence it served (a `ConversationCache`): a follow-up turn of the same
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

from ..cache import ConversationCache
from ..generate import Response, stream_generate
from .metrics import Metrics

log = logging.getLogger("mlx_mistral.server")


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
        self.conversation = ConversationCache(model)
        self.prefix_cache = prefix_cache
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
                        self.conversation.reset()
                        job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
                    finally:
                        self.metrics.running.dec()
        finally:
            mx.clear_streams()  # MLX needs each thread's streams released before the process exits

    def _serve(self, job: Job) -> None:
        if not self.prefix_cache:
            self.conversation.reset()
        generated: list[int] = []
        first_at = None
        last: Optional[Response] = None
        # the cache reuses its common prefix with job.ids and, however the steps end, records
        # the sequence it then holds
        steps = stream_generate(self.model, self.tokenizer, job.ids, prompt_cache=self.conversation, **job.params)
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
        cached = last.cached_tokens if last is not None else 0
        self.metrics.prompt_tokens.inc(len(job.ids))
        self.metrics.cached_tokens.inc(cached)
        if last is None or last.finish_reason is None:  # cancelled
            self.metrics.completion_tokens.inc(len(generated))
            return
        self.metrics.completion_tokens.inc(last.generation_tokens)
        if last.generation_tokens > 1:
            self.metrics.decode_tps.observe(last.generation_tps)
        job.emit(Finished(last.finish_reason, len(job.ids), last.generation_tokens, cached))
