"""A FastAPI app served by uvicorn in a thread on a free loopback port, for the server tests."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import openai
import uvicorn

from mlx_mistral import generate

WAIT_S = 60  # bound on every wait in the server tests: a hang fails a test instead of the suite


class LiveServer:
    """An app served by uvicorn in a thread, on a free loopback port."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(WAIT_S)

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "unused"),
                             max_retries=0, timeout=WAIT_S, **kw)

    def direct(self, prompt, max_tokens):
        """Greedy reply computed straight from the model, while the server's worker waits."""
        model, tok = self.model
        with self.app.state.worker.lock:
            return generate(model, tok, prompt, max_tokens=max_tokens, temperature=0)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=WAIT_S).text
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def wait_idle(self):
        deadline = time.monotonic() + WAIT_S
        while self.metric("mlx_mistral_requests_running") or self.metric("mlx_mistral_queue_depth"):
            assert time.monotonic() < deadline, "the server stayed busy"
            time.sleep(0.05)
