"""The generation worker of the server: one thread runs the engine; handlers submit jobs.

MLX is not re-entrant, so every model call happens on this one thread. HTTP handlers on the
event loop build a `Request`, submit a `Job` and receive its events through `Job.emit`. The
engine batches every running job into one forward pass per step, admits new ones in arrival
order up to `max_batch`, and keeps recent conversations so a follow-up turn starts from the KV
of the turn before it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from ..distributed.group import OutOfStep
from ..distributed.lockstep import engine_for
from ..engine import DEFAULT_MAX_BATCH, Request, Response, Stream
from ..errors import first_line
from .metrics import Metrics

log = logging.getLogger("mlx_mistral.server")


@dataclass
class Finished:
    """The last event of one reply that ran to its end."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    index: int = 0


@dataclass
class Failed:
    """The last event of a job that broke; `message` is for the client."""

    message: str


@dataclass
class Job:
    request: Request
    emit: Callable[[object], None]  # delivers a Response, Finished or Failed to the requester
    stream: Optional[Stream] = None
    queued_at: float = field(default_factory=time.perf_counter)
    first_at: Optional[float] = None

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel()


class Worker:
    """Owns the engine and the thread that steps it."""

    def __init__(self, model, tokenizer, metrics: Metrics, *, prefix_cache: bool = True,
                 max_batch: int = DEFAULT_MAX_BATCH):
        # two kept conversations per slot: a client's next turn usually finds its own
        self.engine = engine_for(model, tokenizer, max_batch=max_batch, prefix_cache=2 * max_batch if prefix_cache else 0)
        self.metrics = metrics
        self.jobs: list[Job] = []
        self.jobs_lock = threading.Lock()
        # held while a step runs: whoever else needs the model in this process waits on it
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.broken: Optional[str] = None  # a sharded model's ranks fell out of step: the server ends

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="mlx-mistral-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish what is running and queued, then end the thread."""
        if self._thread is not None:
            while self.engine.busy and self._thread.is_alive():
                time.sleep(0.05)
            self._stop.set()
            self.engine.stop_waiting()
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue a job (refuses a request the engine cannot run with a MistralError)."""
        job.stream = self.engine.submit(job.request)
        with self.jobs_lock:
            self.jobs.append(job)
        self.metrics.queue_depth.inc()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                with self.engine.wake:
                    while not self.engine.busy and not self._stop.is_set():
                        self.engine.wake.wait(0.5)
                if self._stop.is_set():
                    break
                with self.lock:
                    try:
                        self.engine.step()
                    # the worker must outlive any one step's failure, or the server hangs
                    except OutOfStep as e:  # no step can run again: fail everything and end the server
                        self.broken = str(e)
                        self._fail_all(f"generation failed: {e}")
                        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful stop; serve() then exits 1
                        break
                    except Exception as e:  # noqa: BLE001
                        log.exception("generation failed")
                        self._fail_all(f"generation failed: {type(e).__name__}: {e}")
                self._deliver()
        finally:
            mx.clear_streams()  # MLX needs each thread's streams released before the process exits

    def _fail_all(self, message: str) -> None:
        self.engine.reset()
        with self.jobs_lock:
            jobs, self.jobs = self.jobs, []
        for job in jobs:
            if job.first_at is None:
                self.metrics.queue_depth.dec()
            job.emit(Failed(message))
        self.metrics.running.set(0)

    def _deliver(self) -> None:
        """Pass each job's new responses on; a finished reply becomes a Finished event."""
        with self.jobs_lock:
            jobs = list(self.jobs)
        for job in jobs:
            stream = job.stream
            while stream.events:
                self._relay(job, stream.events.popleft())
            if stream.done:
                if stream.error is not None and job.first_at is None:  # refused when admitted
                    self._relay_failure(job, stream.error)
                elif job.first_at is None:  # cancelled while it waited
                    self.metrics.queue_depth.dec()
                with self.jobs_lock:
                    self.jobs.remove(job)
        self.metrics.running.set(len(self.engine.active))

    def _relay_failure(self, job: Job, error: BaseException) -> None:
        if job.first_at is None:
            job.first_at = time.perf_counter()
            self.metrics.queue_depth.dec()
        log.error("generation failed: %s", first_line(error))
        job.emit(Failed(f"generation failed: {first_line(error)}"))

    def _relay(self, job: Job, r: Response) -> None:
        if job.first_at is None:  # out of the queue: its first event, a token or its end
            job.first_at = time.perf_counter()
            self.metrics.queue_depth.dec()
            if r.token is not None:
                self.metrics.ttft.observe(job.first_at - job.queued_at)
        if r.finish_reason is None:
            if r.token is not None:
                self.metrics.completion_tokens.inc()
            job.emit(r)
            return
        if r.index == 0:
            self.metrics.prompt_tokens.inc(r.prompt_tokens)
            self.metrics.cached_tokens.inc(r.cached_tokens)
        if r.finish_reason == "cancelled":
            self.metrics.cancelled.inc()
            return
        if r.finish_reason == "error":
            return self._relay_failure(job, job.stream.error)
        job.emit(r)  # the text the detokenizer and the stop matcher held back
        if r.generation_tokens > 1:
            self.metrics.decode_tps.observe(r.generation_tps)
        job.emit(Finished(r.finish_reason, r.prompt_tokens, r.generation_tokens, r.cached_tokens, r.index))
