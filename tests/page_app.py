"""The server app with the chat page, built as `serve` builds it."""

from __future__ import annotations

from mlx_mistral.server import create_app
from mlx_mistral.webui import PAGE_PATH, install_page


def api_guard(app) -> list:
    """The dependencies that guard the app's API (its key check), read off the chat route."""
    route = next(r for r in app.routes if getattr(r, "path", None) == "/v1/chat/completions")
    return list(route.dependencies)


def page_app(model, tokenizer, **kw):
    """create_app(...) with the page; installed here only where create_app does not do it yet."""
    app = create_app(model, tokenizer, **kw)
    if not any(getattr(r, "path", None) == PAGE_PATH for r in app.routes):
        install_page(app, guard=api_guard(app))
    return app
