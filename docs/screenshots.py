"""Screenshots of the chat page (docs/ui-{desktop,phone}-{light,dark}.png).

    python docs/screenshots.py

Serves the page on a tiny random-weight model (`synth --preset tiny`) and opens it in headless
chromium. A random model writes noise, so the conversation shown is illustrative text put in the
page's storage; the numbers under each reply are the page's own measurement of the tiny model
generating that many tokens on this machine.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "tests"))  # live_server.py, page_app.py

from live_server import LiveServer  # noqa: E402
from page_app import page_app  # noqa: E402

PALINDROME = """Two common ways to do it:

```python
def is_palindrome(text: str) -> bool:
    letters = [c.lower() for c in text if c.isalnum()]
    return letters == letters[::-1]
```

| Approach | Time | Extra memory |
|---|---|---|
| Reverse and compare | O(n) | O(n) |
| Two pointers | O(n) | O(1) |

- The first is the clearest and fast enough for most inputs.
- Two pointers avoid the copy when strings are very long.
"""
CALL = {"id": "Wq3xK9bPz", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
CONVERSATIONS = [
    ("Palindromes in Python", [
        {"role": "user", "content": "Write a Python palindrome check and compare two approaches in a table."},
        {"role": "assistant", "content": PALINDROME, "finish": "stop"},
        {"role": "user", "content": "What's the weather in Paris right now?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL], "finish": "tool_calls"},
        {"role": "tool", "tool_call_id": CALL["id"], "name": "get_weather",
         "content": '{"temp_c": 21, "sky": "sunny"}'},
        {"role": "assistant", "content": "It is **21 °C** and sunny in Paris.", "finish": "stop"},
    ]),
    ("Trip to Lisbon", [{"role": "user", "content": "Plan three days in Lisbon."}]),
    ("Rust or Go for a CLI?", [{"role": "user", "content": "Rust or Go for a small CLI tool?"}]),
]


def measured_meta(page, tokens: int) -> dict:
    """The page's numbers for a real reply of `tokens` tokens from the tiny model."""
    page.evaluate("n => localStorage.setItem('mlx-mistral.settings', JSON.stringify({max_tokens: n}))", tokens)
    page.reload()
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    page.locator("[data-stat=finish]").wait_for()
    convs = page.evaluate("() => JSON.parse(localStorage.getItem('mlx-mistral.conversations'))")
    return convs[0]["messages"][-1]["meta"]


def seed(page, tokenizer) -> None:
    stored = []
    for i, (title, messages) in enumerate(CONVERSATIONS):
        for m in messages:
            if m["role"] == "assistant":
                text = m["content"] or json.dumps(m.get("tool_calls"))
                m["meta"] = measured_meta(page, max(2, len(tokenizer.encode(text)))) | {"finish": m.pop("finish")}
        stored.append({"id": f"demo-{i}", "title": title, "created": 0, "messages": messages})
    page.evaluate("""c => { localStorage.setItem('mlx-mistral.conversations', JSON.stringify(c));
                           localStorage.setItem('mlx-mistral.current', JSON.stringify('demo-0'));
                           localStorage.removeItem('mlx-mistral.settings'); }""", stored)


def main() -> None:
    from playwright.sync_api import sync_playwright

    from mlx_mistral import load
    from mlx_mistral.synth import synth

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        model, tokenizer = load(synth(Path(tmp) / "tiny", "tiny", seed=0))
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        with LiveServer(page_app(model, tokenizer, model_id="tiny")) as server:
            context = browser.new_context()
            page = context.new_page()
            page.goto(server.url)
            seed(page, tokenizer)
            state = context.storage_state()
            for device, size, scale in (("desktop", (1280, 800), 1), ("phone", (390, 844), 2)):
                for theme in ("light", "dark"):
                    shot = browser.new_context(viewport=dict(zip(("width", "height"), size)), color_scheme=theme,
                                               device_scale_factor=scale, storage_state=state)
                    view = shot.new_page()
                    view.goto(server.url)
                    view.locator(".md table").wait_for()
                    view.locator("#log").evaluate("log => { log.scrollTop = 0; }")
                    view.screenshot(path=DOCS / f"ui-{device}-{theme}.png")
                    shot.close()
        browser.close()


if __name__ == "__main__":
    main()
