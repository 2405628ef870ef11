"""Every bad request body or header gets a 4xx JSON error, and the server keeps serving: the next
good request on the same keep-alive connection works. /metrics counts every response."""

from __future__ import annotations

import httpx
import pytest

from live_server import WAIT_S, LiveServer
from mlx_mistral.constrain import Limits
from mlx_mistral.server import create_app

MODEL = "tiny"
KEY = "s3cret"
LIMITS = Limits(max_string=8, max_items=3, max_properties=3, max_depth=2, max_calls=2)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def servers(tiny):
    """(open server, server with an API key), each with one keep-alive client."""
    model, tok = tiny
    open_app = create_app(model, tok, model_id=MODEL, default_max_tokens=4, limits=LIMITS, ui=False)
    keyed_app = create_app(model, tok, model_id=MODEL, default_max_tokens=4, limits=LIMITS, api_key=KEY, ui=False)
    with LiveServer(open_app) as a, LiveServer(keyed_app) as b:
        with httpx.Client(base_url=a.url, timeout=WAIT_S) as ca, httpx.Client(base_url=b.url, timeout=WAIT_S) as cb:
            yield {"open": (a, ca), "keyed": (b, cb)}


def chat(schema=None, tools=None, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    if tools is not None:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": tools}}]
        body["tool_choice"] = "required"
    return body | extra


def nested(levels: int) -> dict:
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


RECURSIVE = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
RECURSIVE_DEFS = {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                  "required": ["next"]}}, "$ref": "#/$defs/n"}
UNSATISFIABLE = {
    "recursive $ref": RECURSIVE, "recursive $defs": RECURSIVE_DEFS, "not everything": {"not": {}},
    "not true": {"not": True}, "empty enum": {"enum": []}, "empty type": {"type": []},
    "crossed lengths": {"type": "string", "minLength": 5, "maxLength": 2},
    "crossed bounds": {"type": "integer", "minimum": 5, "maximum": 2},
    "crossed items": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 1},
    "required false": {"type": "object", "properties": {"a": False}, "required": ["a"]},
    "allOf false": {"allOf": [{"type": "string"}, False]},
    "anyOf all recursive": {"anyOf": [RECURSIVE]},
    "items false, one needed": {"type": "array", "items": False, "minItems": 1},
    "dangling $ref": {"$ref": "#/$defs/missing"},
    "nested 40": nested(40), "nested 100": nested(100),
}


def case(name, body=None, *, status=400, code=None, method="POST", path=CHAT, raw=None, headers=None,
         server="open"):
    return pytest.param(dict(body=body, status=status, code=code, method=method, path=path, raw=raw,
                             headers=headers or {}, server=server), id=name)


CASES = [
    # a lone surrogate is valid JSON text but not UTF-8: it must not break the reply or the connection
    case("surrogate model chat", raw=b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
         status=404, code="model_not_found"),
    case("surrogate model completions", raw=b'{"model": "\\udfff x", "prompt": "hi"}', path=COMPLETIONS,
         status=404, code="model_not_found"),
    case("surrogate role", raw=b'{"messages": [{"role": "\\ud800", "content": "hi"}]}'),
    case("surrogate tool name", raw=b'{"messages": [{"role": "user", "content": "hi"}], "tools": '
                                    b'[{"type": "function", "function": {"name": "\\ud800"}}]}'),
    case("model path not UTF-8", method="GET", path="/v1/models/%ff%fe", status=404, code="model_not_found"),
    # bodies that are not the request
    case("not JSON", raw=b"{not json", code="invalid_json"),
    case("empty body", raw=b""),
    case("JSON list", raw=b"[]"), case("JSON string", raw=b'"hi"'), case("JSON null", raw=b"null"),
    case("nested 100k lists", raw=b"[" * 100_000 + b"]" * 100_000),
    case("nested 100k objects", raw=b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    case("NaN temperature", raw=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    case("infinite temperature", raw=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}'),
    case("temperature 3", chat(temperature=3)),
    case("top_p 0", chat(top_p=0)), case("top_p 2", chat(top_p=2)),
    case("seed text", chat(seed="x")), case("seed fraction", chat(seed=1.5)),
    case("max_tokens 0", chat(max_tokens=0)), case("max_tokens -1", chat(max_tokens=-1)),
    case("max_tokens past the context", chat(max_tokens=10**9), code="context_length_exceeded"),
    case("prompt past the context", {"prompt": [5] * 40_000, "max_tokens": 1}, path=COMPLETIONS,
         code="context_length_exceeded"),
    case("prompt ids out of range", {"prompt": [5, 10**9], "max_tokens": 1}, path=COMPLETIONS),
    case("negative prompt ids", {"prompt": [5, -1], "max_tokens": 1}, path=COMPLETIONS),
    case("empty prompt list", {"prompt": [], "max_tokens": 1}, path=COMPLETIONS),
    case("two prompts", {"prompt": ["a", "b"], "max_tokens": 1}, path=COMPLETIONS),
    case("n over the batch", chat(n=99)),
    case("no messages", chat(messages=[])),
    case("bad role", chat(messages=[{"role": "robot", "content": "hi"}])),
    case("content number", chat(messages=[{"role": "user", "content": 5}])),
    case("five stops", chat(stop=["a", "b", "c", "d", "e"])),
    case("tool_choice names no tool", chat(tools={"type": "object"}, tool_choice={
        "type": "function", "function": {"name": "g"}})),
    case("required tool_choice without tools", chat(tool_choice="required")),
    case("schema not an object", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "r", "schema": False}})),
    case("invalid schema", chat(schema={"type": 5})),
    case("unknown path", method="GET", path="/v2/nothing", status=404),
    case("wrong method", method="GET", path=CHAT, status=405),
    # the API key check
    case("no key", chat(), server="keyed", status=401, code="invalid_api_key"),
    case("wrong key", chat(), server="keyed", status=401, code="invalid_api_key",
         headers={"Authorization": "Bearer nope"}),
    case("non-ASCII key", chat(), server="keyed", status=401, code="invalid_api_key",
         headers={"Authorization": "Bearer \xe9\xff".encode("latin-1")}),
    case("non-ASCII scheme", chat(), server="keyed", status=401, code="invalid_api_key",
         headers={"Authorization": "B\xe9arer x".encode("latin-1")}),
    case("basic auth", chat(), server="keyed", status=401, code="invalid_api_key",
         headers={"Authorization": "Basic czNjcmV0"}),
    case("metrics without key", method="GET", path="/metrics", server="keyed", status=401),
]
for name, schema in UNSATISFIABLE.items():
    CASES.append(case(f"schema {name}", chat(schema=schema)))
    CASES.append(case(f"schema {name} streamed", chat(schema=schema, stream=True)))
    CASES.append(case(f"tool parameters {name}", chat(tools=schema)))


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def send(client: httpx.Client, c: dict) -> httpx.Response:
    headers = dict(c["headers"])
    if c["raw"] is not None:
        headers.setdefault("content-type", "application/json")
        return client.request(c["method"], c["path"], content=c["raw"], headers=headers)
    if c["body"] is None:
        return client.request(c["method"], c["path"], headers=headers)
    return client.request(c["method"], c["path"], json=c["body"], headers=headers)


def peer_port(r: httpx.Response) -> int:
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.parametrize("c", CASES)
def test_bad_request_is_one_json_error_and_the_connection_serves_on(servers, c):
    _, client = servers[c["server"]]
    r = send(client, c)
    assert r.status_code == c["status"], r.text[:300]
    assert r.headers["content-type"].startswith("application/json")  # never a stream, never HTML
    error = r.json()["error"]
    assert error["message"] and "\n" not in error["message"] and len(error["message"]) < 600
    if c["code"]:
        assert error["code"] == c["code"]
    port = peer_port(r)
    good = client.post(CHAT, json=GOOD, headers={"Authorization": f"Bearer {KEY}"})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"
    assert peer_port(good) == port  # the same connection: the bad request did not reset it


def test_unsatisfiable_stream_is_refused_before_any_chunk(servers):
    _, client = servers["open"]
    with client.stream("POST", CHAT, json=chat(schema=RECURSIVE, stream=True)) as r:
        body = r.read()
    assert r.status_code == 400 and b"data:" not in body


def test_a_satisfiable_recursive_schema_is_served(servers):
    """Recursion that may stop (an optional property, a null branch) is not refused."""
    _, client = servers["open"]
    linked = {"$defs": {"n": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
        "next": {"$ref": "#/$defs/n"}}, "required": ["next"]}]}}, "$ref": "#/$defs/n"}
    for schema in (linked, {"type": "object", "properties": {"a": {"$ref": "#"}}}):
        r = client.post(CHAT, json=chat(schema=schema, max_tokens=30))
        assert r.status_code == 200, r.text[:300]


def test_an_exception_escaping_a_handler_is_a_counted_json_500(tiny, monkeypatch):
    model, tok = tiny
    app = create_app(model, tok, model_id=MODEL, default_max_tokens=2, ui=False)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
        def boom(text):
            raise RuntimeError("a bug")

        monkeypatch.setattr(tok, "encode", boom)
        r = client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        port = peer_port(r)
        monkeypatch.undo()
        good = client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1})
        assert good.status_code == 200 and peer_port(good) == port
        text = client.get("/metrics").text
        assert 'mlx_mistral_requests_total{path="/v1/completions",status="500"} 1.0' in text


def test_metrics_count_every_response(tiny):
    model, tok = tiny
    app = create_app(model, tok, model_id=MODEL, default_max_tokens=2, ui=False)
    sent = [c.values[0] for c in CASES if c.values[0]["server"] == "open"][:25]
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=WAIT_S) as client:
        statuses = [send(client, c).status_code for c in sent]
        statuses.append(client.post(CHAT, json=GOOD).status_code)
        text = client.get("/metrics").text
    counted = {}
    for line in text.splitlines():
        if line.startswith("mlx_mistral_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            counted[status] = counted.get(status, 0) + float(line.rsplit(" ", 1)[1])
    expected = {}
    for s in statuses:
        expected[str(s)] = expected.get(str(s), 0) + 1
    assert counted == expected and sum(counted.values()) == len(sent) + 1
