"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model held in memory.

`create_app` puts the settings, the generation worker (worker.py), the tokenizer and the metrics
on `app.state`, where the endpoints (routes.py) find them; the worker runs for the app's lifespan.
`serve` loads a model and runs the app under uvicorn until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from fastapi import FastAPI

from .. import __version__
from ..constrain import Limits
from ..engine import DEFAULT_MAX_BATCH
from ..errors import MistralError
from .errors import install_error_handlers
from .metrics import CountRequests, Metrics
from .responses import ConversationStore
from .responses import router as responses_router
from .routes import guarded, router
from .worker import Worker

# Reply length of a request that sets none: long answers fit, and one client that forgets the
# field cannot hold a batch slot for the whole context (32k tokens is minutes on a laptop).
DEFAULT_MAX_TOKENS = 4096
log = logging.getLogger("mlx_mistral.server")


class Settings:
    def __init__(self, model_id: str, aliases: set[str], context_length: int, api_key: Optional[str],
                 default_max_tokens: Optional[int], limits: Limits):
        self.model_id, self.aliases = model_id, aliases | {model_id}
        self.context_length, self.api_key, self.default_max_tokens = context_length, api_key, default_max_tokens
        self.limits = limits
        self.created = int(time.time())


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    worker = app.state.worker
    worker.start()
    try:
        yield
    finally:
        await asyncio.to_thread(worker.stop)


def create_app(model, tokenizer, *, model_id: str = "mlx-mistral", aliases: set[str] = frozenset(),
               api_key: Optional[str] = None, context_length: Optional[int] = None,
               default_max_tokens: Optional[int] = None, prefix_cache: bool = True,
               limits: Optional[Limits] = None, max_batch: int = DEFAULT_MAX_BATCH, ui: bool = True) -> FastAPI:
    """The ASGI app serving `model`; its generation worker runs for the app's lifespan.

    Up to `max_batch` requests generate together, in one forward pass per step; later ones wait
    in arrival order. A request without max_tokens gets `default_max_tokens` (DEFAULT_MAX_TOKENS
    when None), capped by the context. `limits` bound the values of constrained tool calls and
    JSON replies where their schemas leave them unbounded (see `constrain.Limits`). `ui` serves
    the chat page at /."""
    settings = Settings(model_id, set(aliases), context_length or model.args.max_position_embeddings,
                        api_key, default_max_tokens or DEFAULT_MAX_TOKENS, limits or Limits())
    metrics = Metrics()
    worker = Worker(model, tokenizer, metrics, prefix_cache=prefix_cache, max_batch=max_batch)
    app = FastAPI(title="mlx-mistral", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.tokenizer = tokenizer
    install_error_handlers(app)
    app.add_middleware(CountRequests, metrics=metrics)
    app.include_router(router)
    app.state.responses = ConversationStore()
    app.include_router(responses_router)
    if ui:
        from ..webui import install_page

        install_page(app, guard=guarded)
    return app


# -- running it -----------------------------------------------------------------------------------

def served_name(model_path: str) -> tuple[str, set[str]]:
    """The id clients see (a hub id as is, a folder by its name) and the names also accepted."""
    path = Path(model_path).expanduser()
    if path.exists():
        return path.resolve().name, {model_path, str(path.resolve())}
    return model_path, {model_path}


def _quiet_exit_server():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the stop signal once it has shut down gracefully; a drained stop on
        Ctrl-C or SIGTERM is the normal end of `serve` here (exit status 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


MIN_SERVED_CONTEXT = 256  # tokens: below this a chat request could hardly hold its prompt


def served_context(model_path: str, max_batch: int) -> int:
    """The longest request (prompt + reply, in tokens) `serve` accepts: the model's context, or
    less where this machine's memory cannot hold `max_batch` such requests at once."""
    from .. import memory
    from ..load import read_config, resolve

    config = read_config(resolve(model_path))
    limit = config.get("max_position_embeddings", 32768)
    # the batch's KV as one sequence of max_batch x the context: the planner caps a plan at the
    # model's own limit, so it is raised to the batch's total here
    batch = memory.plan(dict(config, max_position_embeddings=limit * max_batch))
    budget = memory.machine_budget()
    per_request = min(limit, batch.tokens_that_fit(budget.bytes) // max_batch)
    if per_request < MIN_SERVED_CONTEXT:
        raise MistralError(f"{max_batch} requests at once leave {per_request} tokens each in this machine's memory "
                           f"budget ({budget.bytes / 1e9:.1f} GB, {budget.source}): use a smaller --max-batch "
                           f"or a smaller model")
    if per_request < limit:
        log.warning("serving requests of up to %d tokens (the model accepts %d): %d at once is what "
                    "%.1f GB hold", per_request, limit, max_batch, budget.bytes / 1e9)
    return per_request


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8080, api_key: Optional[str] = None,
          default_max_tokens: Optional[int] = None, drain_timeout: float = 30.0, log_level: str = "info",
          max_batch: int = DEFAULT_MAX_BATCH, ui: bool = True, limits: Optional[Limits] = None) -> None:
    """Load the model and serve it until Ctrl-C or SIGTERM; in-flight requests finish first
    (for up to `drain_timeout` seconds)."""
    import uvicorn

    from ..load import load

    context = served_context(model_path, max_batch)
    model, tokenizer = load(model_path, context=context)
    model_id, aliases = served_name(model_path)
    app = create_app(model, tokenizer, model_id=model_id, aliases=aliases, api_key=api_key, context_length=context,
                     default_max_tokens=default_max_tokens, max_batch=max_batch, ui=ui, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout)
    server = _quiet_exit_server()(config)
    server.run()
    if not server.started:
        raise MistralError(f"could not serve on {host}:{port} (is the port in use?)")
    if app.state.worker.broken:
        raise MistralError(app.state.worker.broken)
