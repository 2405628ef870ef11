"""The chat page at GET /: one static HTML file (script and styles inline, nothing fetched from
the internet) and the one endpoint it needs besides the OpenAI API, POST /ui/markdown.

Markdown is rendered here, on the server, by markdown-it-py: a maintained CommonMark
implementation the package already installs (rich depends on it), so the page ships no
JavaScript library and needs no build step. Raw HTML is off (`html=False`): every `<` of model
output comes back escaped, and markdown-it's link validation drops `javascript:`, `vbscript:`,
`file:` and non-image `data:` URLs. The page puts only this HTML into its DOM (and plain text,
through `textContent`, while a reply streams). A Content-Security-Policy that lets only the
page's own inline script run (by its hash) is the second lock.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib import resources
from typing import Sequence

from fastapi import FastAPI
from fastapi.params import Depends
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

PAGE_PATH = "/"
RENDER_PATH = "/ui/markdown"
MAX_MARKDOWN_CHARS = 1_000_000  # far above any reply; bounds the work one render call can ask for


class MarkdownRequest(BaseModel):
    text: str = Field(max_length=MAX_MARKDOWN_CHARS)


@lru_cache(maxsize=1)
def _markdown():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])

    def link_open(renderer, tokens, idx, options, env):
        # a link opens beside the chat instead of replacing it, and learns nothing of the page
        tokens[idx].attrSet("target", "_blank")
        tokens[idx].attrSet("rel", "noopener noreferrer")
        return renderer.renderToken(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    return md


def render_markdown(text: str) -> str:
    """Model output as safe HTML: no raw HTML passes, dangerous link schemes are dropped."""
    return _markdown().render(text)


def page_html() -> str:
    return resources.files(__name__).joinpath("index.html").read_text(encoding="utf-8")


def _csp(html: str) -> str:
    """Only the page's own inline script may run; it may talk only to this server; images only
    from here or data: URLs (a reply cannot make the browser fetch a remote tracker)."""
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in scripts)
    # inline style attributes stay allowed: markdown-it aligns table columns with them
    return (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def install_page(app: FastAPI, *, guard: Sequence[Depends] = ()) -> None:
    """Add the page (GET /, public: it holds no data) and its Markdown endpoint, which `guard`
    (the dependencies that protect the API, e.g. `[Depends(authorize)]`) protects like the API."""
    html = page_html()
    headers = {"Content-Security-Policy": _csp(html), "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

    @app.get(PAGE_PATH, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(html, headers=headers)

    @app.post(RENDER_PATH, dependencies=list(guard), include_in_schema=False)
    def markdown(body: MarkdownRequest):  # sync: FastAPI runs it in a thread, off the event loop
        return {"html": render_markdown(body.text)}
