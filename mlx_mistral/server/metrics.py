"""Prometheus metrics of the server, in a registry of its own (one per app, so several apps in
one process, as in tests, do not collide), and the middleware counting requests."""

from __future__ import annotations

import contextlib
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
log = logging.getLogger("mlx_mistral.server")

# seconds: from a few ms (tiny models, warm prefix) to minutes (long prompts queued behind others)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mlx_mistral_requests", "HTTP requests by path and status code",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter("mlx_mistral_prompt_tokens", "Prompt tokens of served requests",
                                     registry=r)
        self.cached_tokens = Counter("mlx_mistral_cached_prompt_tokens",
                                     "Prompt tokens whose KV was reused from the previous request", registry=r)
        self.completion_tokens = Counter("mlx_mistral_completion_tokens", "Tokens generated", registry=r)
        self.cancelled = Counter("mlx_mistral_requests_cancelled",
                                 "Generations stopped because the client went away", registry=r)
        self.ttft = Histogram("mlx_mistral_time_to_first_token_seconds",
                              "From queueing a request to its first generated token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.decode_tps = Histogram("mlx_mistral_decode_tokens_per_second",
                                    "Decode speed of each request after its first token", buckets=TPS_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("mlx_mistral_queue_depth", "Requests waiting for the model", registry=r)
        self.running = Gauge("mlx_mistral_requests_running", "Requests being generated (0 or 1)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """Counts every response by path and status, and turns an exception that escapes a handler
    into a counted JSON 500 (pure ASGI: leaves streaming and disconnects alone).

    It sits outside FastAPI's exception handlers, so 4xx replies pass through it as responses;
    what reaches it as an exception no handler knew. Logged once, then the server goes on."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        def count(status: int) -> None:
            route = scope.get("route")
            path = route.path if route is not None else "other"  # unknown paths share one label
            self.metrics.requests.labels(path=path, status=str(status)).inc()

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:  # noqa: BLE001  (any escape: the client gets an answer, not a reset)
            log.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            if started:  # a stream already under way: end it; its status was counted
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            from .errors import internal_error

            count(500)
            await internal_error()(scope, receive, send)
