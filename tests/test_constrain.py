"""Constrained decoding: random weights (the model's judgement at its worst) over many seeds still
give tool calls and JSON replies that parse and validate."""

from __future__ import annotations

import json

import jsonschema
import pytest

from mlx_mistral.constrain import Limits, bound_schema, free_json, plan
from mlx_mistral.errors import MistralError
from mlx_mistral.generate import chat_completion, stream_chat_completion
from mlx_mistral.sampling import processors_from
from mlx_mistral.tools import CALL_ID

BOOK = {"type": "function", "function": {"name": "book_trip", "description": "Book a trip", "parameters": {
    "type": "object",
    "properties": {
        "traveller": {"type": "object", "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["vip", "child", "pet"]}}},
            "required": ["name", "age"]},
        "mode": {"enum": ["train", "plane", "boat"]},
        "nights": {"type": "integer"},
        "budget": {"type": "number", "minimum": 0},
        "stops": {"type": "array", "items": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["city", "days"]}},
        "refundable": {"type": "boolean"}},
    "required": ["traveller", "mode", "nights", "stops"]}}}
PING = {"type": "function", "function": {"name": "ping", "description": "Ping",
                                         "parameters": {"type": "object", "properties": {}}}}
TOOLS = [BOOK, PING]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "Book me a trip to Rome."}]
# small bounds so a random walk always finishes well inside max_tokens
LIMITS = Limits(max_string=12, max_items=2, max_properties=3, max_depth=2, max_calls=2)
SEEDS = range(20)


def check_calls(message: dict, names: set[str]) -> None:
    assert message["tool_calls"], message
    for call in message["tool_calls"]:
        assert CALL_ID.match(call["id"]) and call["type"] == "function"
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


@pytest.mark.parametrize("seed", SEEDS)
def test_required_calls_always_parse_and_validate(tiny, seed):
    out = chat_completion(*tiny, MESSAGES, tools=TOOLS, tool_choice="required", limits=LIMITS,
                          max_tokens=400, temperature=1.0, seed=seed)
    assert out["finish_reason"] == "tool_calls"  # ended at EOS once the grammar accepted
    assert len(out["message"]["tool_calls"]) <= LIMITS.max_calls
    check_calls(out["message"], {"book_trip", "ping"})


def test_named_tool_choice_forces_that_function(tiny):
    for seed in range(4):
        out = chat_completion(*tiny, MESSAGES, tools=TOOLS, tool_choice={"type": "function", "function": {
            "name": "ping"}}, limits=LIMITS, max_tokens=100, temperature=1.0, seed=seed)
        check_calls(out["message"], {"ping"})


def test_auto_lets_text_through_and_a_started_call_is_valid(tiny):
    # biasing [TOOL_CALLS] makes the random model start a call; the grammar must carry it through
    bias = processors_from(logit_bias={9: 30.0})
    for seed in range(4):
        out = chat_completion(*tiny, MESSAGES, tools=TOOLS, limits=LIMITS, logits_processors=bias,
                              max_tokens=400, temperature=1.0, seed=seed)
        assert out["finish_reason"] == "tool_calls"
        check_calls(out["message"], {"book_trip", "ping"})
    plain = chat_completion(*tiny, MESSAGES, tools=TOOLS, max_tokens=12, temperature=1.0, seed=0)
    assert plain["finish_reason"] == "length" and "tool_calls" not in plain["message"]


def test_tool_choice_none_forbids_calls(tiny):
    bias = processors_from(logit_bias={9: 30.0})
    out = chat_completion(*tiny, MESSAGES, tools=TOOLS, tool_choice="none", logits_processors=bias,
                          max_tokens=8, temperature=1.0, seed=0)
    assert "tool_calls" not in out["message"] and out["finish_reason"] != "tool_calls"


REPLY_SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string"}, "score": {"type": "integer", "minimum": -5, "maximum": 5},
    "labels": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1},
    "detail": {"type": "object", "properties": {"ok": {"type": "boolean"}, "ratio": {"type": "number"}},
               "required": ["ok"]}},
    "required": ["answer", "score", "labels", "detail"]}


@pytest.mark.parametrize("seed", range(10))
def test_json_schema_replies_validate(tiny, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": REPLY_SCHEMA}}
    out = chat_completion(*tiny, MESSAGES, response_format=fmt, limits=LIMITS, max_tokens=300,
                          temperature=1.0, seed=seed)
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["message"]["content"]), REPLY_SCHEMA)


@pytest.mark.parametrize("seed", range(5))
def test_json_object_replies_are_objects(tiny, seed):
    out = chat_completion(*tiny, MESSAGES, response_format={"type": "json_object"}, limits=LIMITS,
                          max_tokens=300, temperature=1.0, seed=seed)
    assert out["finish_reason"] == "stop"
    assert isinstance(json.loads(out["message"]["content"]), dict)


def test_streamed_calls_equal_the_whole_reply(tiny):
    kw = dict(tools=TOOLS, tool_choice="required", limits=LIMITS, max_tokens=400, temperature=1.0, seed=3)
    whole = chat_completion(*tiny, MESSAGES, **kw)
    chunks = list(stream_chat_completion(*tiny, MESSAGES, **kw))
    assert chunks[0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["finish_reason"] == "tool_calls" and all(c["finish_reason"] is None for c in chunks[:-1])
    calls = {}
    for c in chunks:
        for piece in c["delta"].get("tool_calls", []):
            got = calls.setdefault(piece["index"], {"name": "", "arguments": ""})
            got["name"] += piece.get("function", {}).get("name", "")
            got["arguments"] += piece.get("function", {}).get("arguments", "")
    want = whole["message"]["tool_calls"]
    assert [calls[i]["name"] for i in sorted(calls)] == [w["function"]["name"] for w in want]
    assert [json.loads(calls[i]["arguments"]) for i in sorted(calls)] == \
        [json.loads(w["function"]["arguments"]) for w in want]
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


def test_bounds_only_narrow_a_schema():
    limits = Limits(max_string=7, max_items=3, max_abs_number=99)
    bounded = bound_schema(SCHEMAS["book_trip"], limits)
    props = bounded["properties"]
    assert props["traveller"]["properties"]["name"]["maxLength"] == 7
    assert props["stops"]["maxItems"] == 3 and props["nights"]["maximum"] == 99
    assert props["budget"]["minimum"] == 0  # a declared bound is kept
    assert props["mode"] == {"enum": ["train", "plane", "boat"]}
    assert bounded["additionalProperties"] is False
    jsonschema.validate({"a": [1, {"b": None}]}, free_json(limits))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": "x" * 8}, free_json(limits))


def test_plans():
    assert plan(None).grammar is None and plan(TOOLS, "none").banned == (9,)
    auto = plan(TOOLS, "auto")
    assert auto.wait_for == 9 and "<[9]>" in auto.grammar
    assert "json_reply" in plan(TOOLS, "auto", {"type": "json_object"}).grammar
    # a forced call wins its turn over a JSON response_format (agents send both)
    forced = plan(TOOLS, "required", {"type": "json_object"})
    assert forced.wait_for is None and "json_reply" not in forced.grammar and "<[9]>" in forced.grammar
    named = plan(TOOLS, {"type": "function", "function": {"name": TOOLS[0]["function"]["name"]}})
    assert '(", " call)' not in named.grammar  # a named choice is exactly one call
    assert '(", " call)' in plan(TOOLS, "required").grammar


def test_stream_rejects_a_bad_request_before_any_chunk(tiny):
    chunks = stream_chat_completion(*tiny, MESSAGES, tools=TOOLS, tool_choice="nope", max_tokens=4)
    with pytest.raises(MistralError, match="not among the tools"):
        next(chunks)
