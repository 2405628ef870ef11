"""The chat page's server side without a browser: safe Markdown, a public page, a guarded
render endpoint."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from fastapi.testclient import TestClient

from mlx_mistral.webui import render_markdown
from page_app import page_app

KEY = "render-test-key"


def test_raw_html_in_model_output_comes_back_escaped():
    html = render_markdown('<script>alert(1)</script>\n\nhi <img src=x onerror="alert(2)">')
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "onerror=&quot;alert(2)&quot;" in html


@pytest.mark.parametrize("url", ["javascript:alert(1)", "JaVaScRiPt:alert(1)", "vbscript:x", "data:text/html,<b>"])
def test_dangerous_links_are_not_links(url):
    assert "<a" not in render_markdown(f"[click]({url})")


def test_markdown_tables_code_and_safe_links():
    html = render_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n\n```py\nx = '<b>'\n```\n\n[site](https://example.org)")
    assert "<table>" in html and "<td>1</td>" in html
    assert '<code class="language-py">x = \'&lt;b&gt;\'' in html
    assert '<a href="https://example.org" target="_blank" rel="noopener noreferrer">site</a>' in html


@pytest.fixture(scope="module")
def keyed(tiny):
    model, tok = tiny
    return TestClient(page_app(model, tok, api_key=KEY))  # no lifespan: the worker never starts


def test_the_page_is_public_and_only_its_own_script_may_run(keyed):
    r = keyed.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    (script,) = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = r.headers["content-security-policy"]
    assert f"script-src 'sha256-{digest}';" in csp and "connect-src 'self'" in csp
    assert "http://" not in r.text.replace("http://www.w3.org", "") and "https://" not in r.text  # works offline


def test_the_render_endpoint_is_guarded_like_the_api(keyed):
    body = {"text": "**hi**"}
    assert keyed.post("/ui/markdown", json=body).status_code == 401
    assert keyed.post("/v1/chat/completions", json={"messages": []}).status_code == 401
    r = keyed.post("/ui/markdown", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json() == {"html": "<p><strong>hi</strong></p>\n"}
    bad = keyed.post("/ui/markdown", json={"text": 3}, headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and "error" in bad.json()


def test_no_ui_serves_no_page(tiny):
    from mlx_mistral.server import create_app

    model, tok = tiny
    client = TestClient(create_app(model, tok, ui=False))  # no lifespan: the worker never starts
    assert client.get("/").status_code == 404
    assert client.post("/ui/markdown", json={"text": "*x*"}).status_code == 404
    assert TestClient(create_app(model, tok)).get("/").status_code == 200
