"""The OpenAI-compatible server, on loopback, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from live_server import WAIT_S, LiveServer
from mlx_mistral.constrain import Limits
from mlx_mistral.server import create_app

MODEL = "tiny"
LIMITS = Limits(max_string=8, max_items=3, max_properties=3, max_depth=2, max_calls=2)


@pytest.fixture(scope="module")
def live(tiny):
    model, tok = tiny
    # replies default to 8 tokens: the fuzzer's requests mostly leave max_tokens out; tight
    # limits let a random model's constrained calls end within small budgets
    with LiveServer(create_app(model, tok, model_id=MODEL, default_max_tokens=8, limits=LIMITS)) as server:
        server.model = tiny
        yield server


def user(text):
    return [{"role": "user", "content": text}]


# -- the official client -----------------------------------------------------------------------

def test_models_and_health(live):
    assert [m.id for m in live.client().models.list().data] == [MODEL]
    assert live.client().models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"


def test_chat_completion_is_the_greedy_reply(live):
    expected = live.direct(user("Hello there"), 10)
    r = live.client().chat.completions.create(model=MODEL, messages=user("Hello there"), max_tokens=10,
                                              temperature=0)
    assert r.choices[0].message.content == expected and expected
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("length", "stop")
    _, tok = live.model
    assert r.usage.prompt_tokens == len(tok.encode_chat(user("Hello there")))
    assert r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_with_usage(live):
    expected = live.direct(user("Stream this"), 10)
    stream = live.client().chat.completions.create(model=MODEL, messages=user("Stream this"), max_tokens=10,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10


def test_stream_ends_with_done(live):
    body = {"model": MODEL, "messages": user("Hi"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=WAIT_S) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")


def test_completions_continue_raw_text(live):
    model, tok = live.model
    prompt = "Once upon a time"
    expected = live.direct(tok.encode(prompt), 8)
    r = live.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected and expected
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    stream = live.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected


def test_seeded_sampling_is_reproducible(live):
    kw = dict(model=MODEL, messages=user("Pick words"), max_tokens=8, temperature=1.0, top_p=0.9)
    a = live.client().chat.completions.create(seed=3, **kw).choices[0].message.content
    b = live.client().chat.completions.create(seed=3, **kw).choices[0].message.content
    assert a == b


# -- concurrency --------------------------------------------------------------------------------

def _stream_text(client, messages, max_tokens, out, key):
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True)
    out[key] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_eight_concurrent_streams_get_their_own_replies(live):
    prompts = [user(f"Question number {i}: what comes next?") for i in range(8)]
    expected = [live.direct(p, 12) for p in prompts]
    assert len(set(expected)) > 1  # distinct prompts, distinct replies: a mix-up would show
    out = {}
    threads = [threading.Thread(target=_stream_text, args=(live.client(), p, 12, out, i)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert [out.get(i) for i in range(8)] == expected


def test_killed_client_frees_its_slot(live):
    others = [user("First other client"), user("Second other client")]
    expected = [live.direct(p, 6) for p in others]
    live.wait_idle()
    cancelled = live.metric("mlx_mistral_requests_cancelled_total")
    generated = live.metric("mlx_mistral_completion_tokens_total")
    body = json.dumps({"model": MODEL, "messages": user("Talk for a long time"), "max_tokens": 20000,
                       "temperature": 0, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=WAIT_S)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while received.count(b"data: ") < 3:  # the role chunk and two tokens: mid-stream
        received += sock.recv(65536)
    out = {}
    threads = [threading.Thread(target=_stream_text, args=(live.client(), p, 6, out, i)) for i, p in enumerate(others)]
    for t in threads:
        t.start()
    sock.close()  # the client dies mid-stream
    for t in threads:
        t.join(WAIT_S)
    assert [out.get(0), out.get(1)] == expected
    live.wait_idle()
    assert live.metric("mlx_mistral_requests_cancelled_total") == cancelled + 1
    # the abandoned reply stopped early instead of running to its 20000 tokens
    assert live.metric("mlx_mistral_completion_tokens_total") - generated < 1000


# -- prefix reuse -------------------------------------------------------------------------------

def test_follow_up_turn_reuses_the_conversation_prefix(live):
    client = live.client()
    first = user("Tell me a story")
    r1 = client.chat.completions.create(model=MODEL, messages=first, max_tokens=8, temperature=0)
    follow_up = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "And then?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=follow_up, max_tokens=8, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens > len(live.model[1].encode_chat(first)) - 1
    assert r2.usage.prompt_tokens_details.cached_tokens < r2.usage.prompt_tokens
    assert r2.choices[0].message.content == live.direct(follow_up, 8)  # same as a fresh run


# -- tool calls and JSON replies, enforced on a random model ------------------------------------

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search_flights", "parameters": {
    "type": "object", "required": ["origin", "passengers", "cabin"],
    "properties": {"origin": {"type": "string"}, "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                   "cabin": {"enum": ["economy", "business"]},
                   "dates": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
                   "filters": {"type": "object", "properties": {"direct": {"type": "boolean"}}}}}}}
TOOLS = [TOOL, SEARCH]
CALL_BUDGET = 256  # tokens: under LIMITS, two calls of these tools end well within it


def check_calls(calls):
    """Each call names a declared tool and its arguments validate against that tool's schema."""
    assert calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        assert call.type == "function" and len(call.id) == 9 and call.id.isalnum()
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_choice_forces_a_valid_call(live, seed):
    r = live.client().chat.completions.create(model=MODEL, messages=user("Book me a flight"), tools=TOOLS,
                                              tool_choice="required", max_tokens=CALL_BUDGET, temperature=1.0,
                                              seed=seed)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls)


def test_named_tool_choice_calls_that_tool(live):
    r = live.client().chat.completions.create(
        model=MODEL, messages=user("Weather?"), tools=TOOLS, max_tokens=CALL_BUDGET, temperature=1.0, seed=5,
        tool_choice={"type": "function", "function": {"name": "search_flights"}})
    calls = r.choices[0].message.tool_calls
    check_calls(calls)
    assert {c.function.name for c in calls} == {"search_flights"}


def test_streamed_tool_call_deltas_assemble_to_the_whole_reply(live):
    kw = dict(model=MODEL, messages=user("Flights to Rome"), tools=TOOLS, tool_choice="required",
              max_tokens=CALL_BUDGET, temperature=1.0, seed=11)
    whole = live.client().chat.completions.create(**kw).choices[0]
    chunks = [c for c in live.client().chat.completions.create(stream=True, **kw) if c.choices]
    assembled = {}
    for delta in (c.choices[0].delta for c in chunks):
        for piece in delta.tool_calls or []:
            call = assembled.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] = (piece.function.name if piece.function else None) or call["name"]
            call["arguments"] += (piece.function.arguments or "") if piece.function else ""
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(assembled.items())] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert all(len(c["id"]) == 9 for c in assembled.values())


def test_tool_result_round_trip(live):
    client = live.client()
    messages = user("Weather in Paris?")
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                       max_tokens=CALL_BUDGET, temperature=1.0, seed=3)
    message = r.choices[0].message
    check_calls(message.tool_calls)
    messages += [message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": '{"result": "ok"}'} for c in message.tool_calls]
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                        max_tokens=8, temperature=1.0, seed=3)
    assert r2.choices[0].message.tool_calls is None and r2.choices[0].finish_reason in ("length", "stop")
    assert r2.usage.prompt_tokens_details.cached_tokens > 0  # the call turn's KV was kept


def test_tool_choice_none_never_calls(live):
    _, tok = live.model
    for seed in range(3):
        stream = live.client().chat.completions.create(
            model=MODEL, messages=user("Call a tool"), tools=TOOLS, tool_choice="none", max_tokens=24,
            temperature=2.0, seed=seed, stream=True)
        chunks = [c for c in stream if c.choices]
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("fmt", ["json_schema", "json_object"])
def test_json_response_format_replies_validate(live, fmt):
    schema = {"type": "object", "required": ["name", "age", "tags"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                             "maximum": 120}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}
    response_format = ({"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
                       if fmt == "json_schema" else {"type": "json_object"})
    for seed in range(2):
        r = live.client().chat.completions.create(model=MODEL, messages=user("A person, as JSON"),
                                                  response_format=response_format, max_tokens=CALL_BUDGET,
                                                  temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "stop"
        value = json.loads(r.choices[0].message.content)
        jsonschema.validate(value, schema if fmt == "json_schema" else {"type": "object"})


def test_an_unenforceable_request_is_refused_before_streaming(live):
    # a forced call that max_tokens cannot hold
    body = {"model": MODEL, "messages": user("hi"), "tools": [TOOL], "tool_choice": "required", "stream": True,
            "max_tokens": 2}
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=WAIT_S)
    assert r.status_code == 400 and "cannot hold one complete call" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "max_tokens"


# -- bad input ----------------------------------------------------------------------------------

LONG = "hello " * 12000  # more tokens than the 32768 of the model's context

BAD = {
    "malformed json": ("/v1/chat/completions", b'{"messages": [', 400, None),
    "body not an object": ("/v1/chat/completions", b"[1, 2]", 400, None),
    "unknown model": ("/v1/chat/completions", {"model": "gpt-4o", "messages": user("hi")}, 404, "model"),
    "invalid role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
                     "messages.0.role"),
    "no messages": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "assistant first": ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]},
                        400, "messages"),
    "image content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, None),
    "tool schema not a schema": ("/v1/chat/completions", {"messages": user("hi"), "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]}, 400, None),
    "tool name with spaces": ("/v1/chat/completions", {"messages": user("hi"), "tools": [
        {"type": "function", "function": {"name": "get weather", "parameters": {}}}]}, 400, None),
    "tool_choice names no tool": ("/v1/chat/completions", {"messages": user("hi"), "tools": [TOOL],
                                  "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, None),
    "json_schema without schema": ("/v1/chat/completions", {"messages": user("hi"),
                                   "response_format": {"type": "json_schema"}}, 400, None),
    "temperature out of range": ("/v1/chat/completions", {"messages": user("hi"), "temperature": 7}, 400,
                                 "temperature"),
    "prompt longer than context": ("/v1/chat/completions", {"messages": user(LONG)}, 400, "messages"),
    "max_tokens past context": ("/v1/chat/completions", {"messages": user("hi"), "max_tokens": 40000}, 400,
                                "max_tokens"),
    "completion too long": ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    "token id out of vocabulary": ("/v1/completions", {"prompt": [1, 99999999]}, 400, "prompt"),
    "two prompts": ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    "unknown path": ("/v1/embeddings", {"input": "hi"}, 404, None),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(live, case):
    path, body, status, param = BAD[case]
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{live.url}{path}", timeout=WAIT_S, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if "context" in case:
        assert error["code"] == "context_length_exceeded"
    ok = live.client().chat.completions.create(model=MODEL, messages=user("still there?"), max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_client_sees_errors_as_exceptions(live):
    with pytest.raises(openai.NotFoundError):
        live.client().chat.completions.create(model="gpt-4o", messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="context"):
        live.client().chat.completions.create(model=MODEL, messages=user(LONG))


def test_api_key_is_required_when_set(tiny):
    model, tok = tiny
    with LiveServer(create_app(model, tok, model_id=MODEL, api_key="s3cret")) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(f"{server.url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        r = server.client(api_key="s3cret").chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
        assert r.choices[0].message.role == "assistant"


def test_metrics_count_requests_and_tokens(live):
    before = live.metric("mlx_mistral_completion_tokens_total")
    r = live.client().chat.completions.create(model=MODEL, messages=user("count me"), max_tokens=4)
    live.wait_idle()
    text = httpx.get(f"{live.url}/metrics").text
    for name in ("mlx_mistral_requests_total", "mlx_mistral_prompt_tokens_total",
                 "mlx_mistral_time_to_first_token_seconds_bucket", "mlx_mistral_decode_tokens_per_second_count",
                 "mlx_mistral_queue_depth"):
        assert name in text
    assert live.metric("mlx_mistral_completion_tokens_total") - before == r.usage.completion_tokens
    assert 'mlx_mistral_requests_total{path="/v1/chat/completions",status="200"}' in text


# -- fuzzing ------------------------------------------------------------------------------------

def test_fuzzed_requests_never_get_a_server_error(live):
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    failures = []
    statuses = []
    for path, method in [("/v1/chat/completions", "POST"), ("/v1/completions", "POST"), ("/v1/models", "GET")]:
        operation = schema[path][method]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                if isinstance(case.body, dict):
                    for key in ("max_tokens", "max_completion_tokens"):  # keep replies short
                        if type(case.body.get(key)) is int and case.body[key] > 4:
                            case.body[key] = 4
                response = case.call(base_url=live.url, timeout=WAIT_S)
                statuses.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.body, response.status_code, response.text[:300]))

            check()
    assert not failures, failures[:3]
    assert 200 in statuses and 400 in statuses  # the fuzzer reached generation and validation alike
    assert live.client().models.list().data  # still serving


# -- the command ---------------------------------------------------------------------------------

def test_serve_command_drains_on_sigterm(tiny_dir):
    proc = subprocess.Popen([sys.executable, "-m", "mlx_mistral.cli", "serve", "-m", str(tiny_dir), "--port", "0",
                             "--api-key", "k3y"], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        lines = []
        deadline = time.monotonic() + WAIT_S
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = found and found.group(1)
        assert url, "".join(lines)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        key = {"Authorization": "Bearer k3y"}
        body = {"messages": user("Keep going"), "max_tokens": 60, "temperature": 0, "stream": True,
                "model": tiny_dir.name}
        events = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=key, timeout=WAIT_S) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                if len(events) == 3:
                    proc.send_signal(signal.SIGTERM)  # mid-stream: the reply must still complete
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(WAIT_S) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
