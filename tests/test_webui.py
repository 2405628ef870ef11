"""The chat page in a real headless browser (Debian's chromium driven by Playwright), against a
live server on the tiny random model: streaming, stop, KV reuse, tools, JSON replies, safe
Markdown, conversations in localStorage, the API key prompt, a phone-width layout."""

from __future__ import annotations

import json
import os
import re
import shutil

import jsonschema
import pytest

from live_server import WAIT_S, LiveServer
from mlx_mistral.constrain import Limits
from page_app import page_app

CHROMIUM = shutil.which("chromium")
# CI sets this: there a missing browser is a failure, not a skip
REQUIRED = os.environ.get("MLX_MISTRAL_BROWSER_TESTS") == "required"
if not CHROMIUM and not REQUIRED:
    pytest.skip("chromium is not installed (apt-get install chromium); the browser tests need it",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")

pytestmark = pytest.mark.browser
MS = WAIT_S * 1000  # Playwright waits in milliseconds
LIMITS = Limits(max_string=8, max_items=3, max_properties=3, max_depth=2, max_calls=1)
KEY = "page-test-key"
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                   "required": ["city"], "additionalProperties": False}}}]
PAYLOAD = ('Look: <script>window.pwned = 1</script> <img src=x onerror="window.pwned = 2"> '
           '[click](javascript:window.pwned=3)\n\n```html\n<script>window.pwned = 4</script>\n```\n')


@pytest.fixture(scope="module")
def live(tiny):
    model, tok = tiny
    with LiveServer(page_app(model, tok, model_id="tiny", limits=LIMITS)) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(tiny):
    model, tok = tiny
    with LiveServer(page_app(model, tok, model_id="tiny", api_key=KEY, limits=LIMITS)) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.fail("MLX_MISTRAL_BROWSER_TESTS=required but chromium is not installed")
    with sync_api.sync_playwright() as p:
        # lan.test: the server as a phone on the LAN sees it, an http origin that is not a secure context
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--host-resolver-rules=MAP lan.test 127.0.0.1"])
        yield b
        b.close()


@pytest.fixture
def open_page(browser):
    """open_page(url, width=1280) -> a page in a fresh browser context (its own localStorage);
    the test fails if the page throws."""
    contexts, errors = [], []

    def open_(url, width=1280, height=800):
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(MS)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        return page

    yield open_
    for c in contexts:
        c.close()
    assert not errors, errors


def configure(page, **fields):
    """Fill the settings panel as a user would."""
    page.click("#open-settings")
    for name, value in fields.items():
        selector = f"#s-{name}"
        if page.eval_on_selector(selector, "e => e.tagName") == "SELECT":
            page.select_option(selector, value)
        else:
            page.fill(selector, str(value))
    page.click("#settings button[value=save]")
    assert not page.is_visible("#settings")


def send(page, text):
    """Type `text`, press Enter, and wait for the reply's finish reason; returns its bubble."""
    n = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    bubble = page.locator(".msg.assistant").nth(n)
    bubble.locator("[data-stat=finish], .error").first.wait_for()
    assert bubble.locator(".error").count() == 0, bubble.locator(".error").inner_text()
    return bubble


def stat(bubble, name) -> str:
    return bubble.locator(f"[data-stat={name}]").inner_text()


# -- streaming, stop, KV reuse, edit, regenerate ---------------------------------------------------

def test_reply_streams_in_pieces_with_its_numbers(live, open_page):
    page = open_page(live.url)
    configure(page, max_tokens=40, temperature=0)
    # every length the reply's text takes on screen, as the DOM changes
    page.evaluate("""() => { window.lengths = [];
        new MutationObserver(() => {
          const b = document.querySelector('#log .msg.assistant:last-child .body');
          if (b) window.lengths.push(b.textContent.length);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }""")
    bubble = send(page, "Tell me a story")
    lengths = [n for n in page.evaluate("window.lengths") if n]
    assert len(set(lengths)) >= 5, lengths  # it grew in pieces, not in one piece at the end
    tokens = int(re.match(r"(\d+) tokens", stat(bubble, "tokens")).group(1))
    assert 1 < tokens <= 40 and stat(bubble, "finish") in ("length", "stop")
    assert re.fullmatch(r"[\d.]+ tok/s", stat(bubble, "tps"))
    assert re.fullmatch(r"TTFT \d+ ms", stat(bubble, "ttft"))
    assert page.locator("#model").inner_text() == "tiny"


def test_stop_ends_a_reply_mid_stream(live, open_page):
    page = open_page(live.url)
    configure(page, max_tokens=3000)
    cancelled = live.metric("mlx_mistral_requests_cancelled_total")
    page.fill("#input", "Talk for a long time")
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('#log .msg.assistant .body')?.textContent.length > 20")
    page.click("#stop")
    bubble = page.locator(".msg.assistant").last
    assert stat(bubble, "finish") == "stopped"
    assert int(re.match(r"~(\d+) tokens", stat(bubble, "tokens")).group(1)) < 3000
    assert page.is_visible("#send") and not page.is_visible("#stop")
    live.wait_idle()  # the server let the generation go
    assert live.metric("mlx_mistral_requests_cancelled_total") == cancelled + 1


def cached_of(bubble) -> tuple[int, int]:
    cached, prompt = re.fullmatch(r"(\d+) of (\d+) prompt tokens cached", stat(bubble, "cached")).groups()
    return int(cached), int(prompt)


def test_follow_up_reuses_kv_and_edit_and_regenerate_resend(live, open_page):
    page = open_page(live.url)
    configure(page, max_tokens=12)
    _, first_prompt = cached_of(send(page, "Hello"))
    cached, prompt = cached_of(send(page, "And then?"))
    # the second turn's prompt starts with the first turn's prompt and reply, kept on the server
    assert cached >= first_prompt and prompt > cached

    page.locator(".msg.user").first.get_by_role("button", name="Edit and resend").click()
    page.fill(".msg.user textarea", "Hello again")
    page.locator(".msg.user").get_by_role("button", name="Send", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('#log .msg').length === 2 && "
                           "document.querySelector('[data-stat=finish]')")
    assert page.locator(".msg.user .body").all_inner_texts() == ["Hello again"]

    page.get_by_role("button", name="Regenerate the reply").click()
    page.wait_for_function("() => !document.getElementById('send').hidden")
    assert page.locator(".msg").count() == 2 and page.locator("[data-stat=finish]").count() == 1


# -- tools and JSON replies ---------------------------------------------------------------------

def test_forced_tool_call_is_a_card_and_a_typed_result_continues(live, open_page):
    page = open_page(live.url)
    configure(page, max_tokens=40, tools=json.dumps(WEATHER), tool_choice="required")
    bubble = send(page, "What is the weather in Paris?")
    assert stat(bubble, "finish") == "tool_calls"
    card = bubble.locator(".tool")
    assert card.locator("h3").inner_text() == "Tool call: get_weather"
    assert json.loads(card.locator(".args").inner_text())["city"] in ("Paris", "Oslo")

    configure(page, tool_choice="auto")  # the model may answer in words now
    card.get_by_role("textbox").fill('{"temp_c": 21}')
    card.get_by_role("textbox").press("Enter")
    page.locator(".msg.assistant").nth(1).locator("[data-stat=finish]").wait_for()
    assert page.locator(".tool .result").first.inner_text() == 'Result: {"temp_c": 21}'
    assert page.locator(".msg .error").count() == 0


def test_json_schema_reply_renders_as_json(live, open_page):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    page = open_page(live.url)
    page.click("#open-settings")
    page.fill("#s-schema", "{not json")
    page.click("#settings button[value=save]")  # refused, with the field named
    assert page.is_visible("#settings")
    assert page.inner_text("#settings-error").startswith("JSON schema: not valid JSON")
    page.click("#settings button[value=cancel]")
    configure(page, max_tokens=40, schema=json.dumps(schema))
    bubble = send(page, "Is the sky blue?")
    jsonschema.validate(json.loads(bubble.locator(".json code").inner_text()), schema)
    assert stat(bubble, "finish") == "stop"


def test_a_refused_request_shows_the_servers_reason(live, open_page):
    page = open_page(live.url)
    configure(page, tools=json.dumps([{"type": "function", "function": {"name": "no spaces allowed"}}]))
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    error = page.locator(".msg.assistant .error")
    error.wait_for()
    assert "tools.0.function.name" in error.inner_text()  # the 400's message, as the server wrote it
    assert page.is_visible("#send")


def sse(*pieces: str) -> str:
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_model_output_never_runs_as_html(live, open_page):
    page = open_page(live.url)
    # the reply comes from a stand-in for the model (a random model cannot be made to write this);
    # the page and its Markdown endpoint are the real ones
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=sse(*re.findall(r".{1,9}", PAYLOAD, re.S))))
    bubble = send(page, "Say something dangerous")
    page.wait_for_function("() => document.querySelector('.msg.assistant .md .codebar .copy')")  # Markdown is in
    assert page.evaluate("window.pwned") is None
    log = page.locator("#log")
    assert log.locator("script, img, iframe, [onerror]").count() == 0
    assert log.locator("a[href^='javascript']").count() == 0
    text = bubble.locator(".body").inner_text()
    assert "<script>window.pwned = 1</script>" in text and 'onerror="window.pwned = 2"' in text
    assert bubble.locator("pre code").inner_text().strip() == "<script>window.pwned = 4</script>"


# -- conversations, the key, the phone -------------------------------------------------------------

def test_conversations_survive_reload_and_can_be_renamed_exported_deleted(live, open_page):
    page = open_page(live.url)
    configure(page, max_tokens=4)
    send(page, "First conversation")
    page.click("#new-chat")
    send(page, "Second conversation")
    page.reload()
    titles = page.locator("#conversations .title")
    assert titles.all_inner_texts() == ["Second conversation", "First conversation"]

    page.get_by_role("button", name="Rename First conversation").click()
    page.fill("#conversations input", "Renamed")
    page.press("#conversations input", "Enter")
    page.reload()
    assert titles.all_inner_texts() == ["Second conversation", "Renamed"]

    with page.expect_download() as download:
        page.get_by_role("button", name="Export Renamed as JSON").click()
    exported = json.loads(open(download.value.path()).read())
    assert exported["title"] == "Renamed"
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][0]["content"] == "First conversation"

    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete Renamed").click()
    page.reload()
    assert titles.all_inner_texts() == ["Second conversation"]


def test_page_asks_for_the_key_once_and_sends_it(keyed, open_page):
    page = open_page(keyed.url)  # the page itself needs no key
    page.locator("#key-dialog").wait_for()
    page.fill("#key-input", KEY)
    page.click("#key-dialog button[value=ok]")
    page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")
    configure(page, max_tokens=4)
    with page.expect_response(lambda r: r.url.endswith("/ui/markdown")) as rendered:
        bubble = send(page, "Hello")
    assert rendered.value.status == 200  # the page's Markdown calls carry the key too
    assert page.locator(".msg .error").count() == 0 and stat(bubble, "finish") in ("length", "stop")
    for path in ("/v1/models", "/ui/markdown"):  # without the key, the API stays closed
        status = page.evaluate("p => fetch(p, {method: p.startsWith('/ui') ? 'POST' : 'GET'}).then(r => r.status)", path)
        assert status == 401, path
    page.reload()
    page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")
    assert not page.is_visible("#key-dialog")  # remembered


def test_nothing_overflows_a_390px_phone_on_the_lan(live, open_page):
    page = open_page(live.url.replace("127.0.0.1", "lan.test"), width=390, height=844)
    assert page.evaluate("() => window.isSecureContext") is False
    wide = ("A_very_long_unbroken_word_" * 6 + "\n\n| a | b | c | d | e | f |\n|---|---|---|---|---|---|\n"
            + "| " + " | ".join(["wide cell content"] * 6) + " |\n\n```\n" + "x = 1  # " + "long line " * 20 + "\n```\n")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=sse(wide)))
    send(page, "A long message from a phone user " * 4)
    page.wait_for_function("() => document.querySelector('.msg.assistant table')")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    # every box but those inside a block that scrolls on its own (code, tables)
    right = page.evaluate("() => Math.max(...[...document.querySelectorAll('#log *, header *, #composer *')]"
                          ".filter(e => e.offsetParent && !e.parentElement.closest('pre, table'))"
                          ".map(e => e.getBoundingClientRect().right))")
    assert right <= 390, right
    copy = page.locator(".codebar .copy").first
    copy.click()  # without the clipboard API (not a secure context) it still copies
    assert copy.inner_text() == "Copied"
    assert not page.is_visible("#conversations")  # the list is a drawer on a phone
    page.click("#menu")
    page.locator("#conversations .title").first.wait_for()
    page.click("#open-settings")
    assert page.evaluate("document.getElementById('settings').getBoundingClientRect().right") <= 390
