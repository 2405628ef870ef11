"""Tool calling: V7 encoding against mistral-common, request checks, and parsing model output."""

from __future__ import annotations

import json

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from mlx_mistral.errors import MistralError
from mlx_mistral.tools import CALL_ID, ToolCallStream, parse_reply, validate_request

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "web-search_2", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}}}}
TOOLS = [WEATHER, SEARCH]


def call(id_, name, args):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CONVERSATIONS = {
    "tools_only": [{"role": "user", "content": "Weather in Paris?"}],
    "one_call_and_result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("abcDEF123", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "{\"temp_c\": 21}"}],
    "parallel_calls": [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Paris and news about it?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("aaaaaaaa1", "get_weather", {"city": "Paris", "unit": "c"}),
            call("bbbbbbbb2", "web-search_2", {"q": "Paris news", "n": 3})]},
        {"role": "tool", "tool_call_id": "aaaaaaaa1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "bbbbbbbb2", "content": "[\"Olympics\"]"}],
    "several_rounds": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("r1r1r1r1r", "get_weather", {"city": "Paris"})]},
        {"role": "tool", "tool_call_id": "r1r1r1r1r", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny in Paris."},
        {"role": "user", "content": "And in Lyon, in Fahrenheit?"},
        {"role": "assistant", "content": None, "tool_calls": [
            call("r2r2r2r2r", "get_weather", {"city": "Lyon", "unit": "f"})]},
        {"role": "tool", "tool_call_id": "r2r2r2r2r", "content": "{\"temp_f\": 70, \"note\": \"très beau\"}"}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_tool_conversations_encode_like_mistral_common(tekken, name):
    messages = CONVERSATIONS[name]
    expected = tekken.mistral.encode_chat_completion(
        ChatCompletionRequest.from_openai(messages=messages, tools=TOOLS)).tokens
    assert tekken.encode_chat(messages, tools=TOOLS) == expected
    assert 5 in expected  # [AVAILABLE_TOOLS]
    validate_request(messages, TOOLS)


def test_tool_results_and_calls_use_v7_tokens(tekken):
    ids = tekken.encode_chat(CONVERSATIONS["several_rounds"], tools=TOOLS)
    # each round: [TOOL_CALLS] ... then [TOOL_RESULTS] call id [TOOL_CONTENT] content
    assert ids.count(9) == ids.count(7) == ids.count(19) == 2
    assert ids.index(5) > ids.index(4)  # tools sit before the last [INST], after earlier turns


@pytest.mark.parametrize("messages, tools, match", [
    ([{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "bad name!"}}], "tool name"),
    ([{"role": "user", "content": "hi"}], [WEATHER, WEATHER], "unique"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
      "tool_calls": [call("short", "get_weather", {})]}], [WEATHER], "9 characters"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        call("abcdefghi", "get_weather", {})]}, {"role": "tool", "tool_call_id": "zzzzzzzzz", "content": "1"}],
     [WEATHER], "answers no earlier tool call"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": "{bad"}}]}],
     [WEATHER], "not valid JSON"),
])
def test_invalid_tool_requests_are_clear_errors(tiny, messages, tools, match):
    from mlx_mistral import chat

    with pytest.raises(MistralError, match=match):
        chat(*tiny, messages, tools=tools, max_tokens=2)


def test_tool_choice_errors(tiny):
    from mlx_mistral import chat

    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(MistralError, match="not among the tools"):
        chat(*tiny, msgs, tools=TOOLS, tool_choice="nope", max_tokens=2)
    with pytest.raises(MistralError, match="needs at least one tool"):
        chat(*tiny, msgs, tool_choice="required", max_tokens=2)
    with pytest.raises(MistralError, match="response_format"):
        chat(*tiny, msgs, response_format={"type": "yaml"}, max_tokens=2)


# ---------------------------------------------------------------------------- parsing

def reply_ids(tekken, text_before: str, calls_json: str) -> list[int]:
    return tekken.encode(text_before, bos=False) + [9] + tekken.encode(calls_json, bos=False)


OUTPUTS = {
    "one": ("", '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]'),
    "several": ("", '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
                    '{"name": "web-search_2", "arguments": {"q": "x \\"y\\" {z}", "n": 2}, "id": "k2k2k2k2k"}]'),
    "text_then_call": ("Let me check. ", '[{"name": "get_weather", "arguments": {"city": "Zürich 日本"}}]'),
    "arguments_as_string": ("", '[{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]'),
}


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_parse_reply_into_openai_tool_calls(tekken, name):
    before, raw = OUTPUTS[name]
    message = parse_reply(reply_ids(tekken, before, raw), tekken)
    expected = json.loads(raw)
    assert message["role"] == "assistant"
    assert message["content"] == (before.strip() or None)
    assert len(message["tool_calls"]) == len(expected)
    for got, want in zip(message["tool_calls"], expected):
        assert got["type"] == "function" and got["function"]["name"] == want["name"]
        args = want["arguments"] if isinstance(want["arguments"], dict) else json.loads(want["arguments"])
        assert json.loads(got["function"]["arguments"]) == args
        assert CALL_ID.match(got["id"]) and got["id"] == want.get("id", got["id"])


@pytest.mark.parametrize("raw, kept", [
    ('[{"name": "get_weather", "arguments": {"city": "Par', 0),
    ('[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "argu', 1),
    ('', 0),
])
def test_a_cut_off_call_list_keeps_only_its_complete_calls(tekken, raw, kept):
    message = parse_reply(reply_ids(tekken, "Hmm ", raw), tekken)
    stream = ToolCallStream()
    deltas = []
    for t in reply_ids(tekken, "Hmm ", raw):
        deltas += stream.feed(t, tekken.decode([t]))
    deltas += stream.finish()
    assert stream.cut and not stream.failed and len(stream.calls) == kept
    content, calls = reassemble(deltas)
    assert content == "Hmm "  # no raw call text
    assert len(message.get("tool_calls", [])) == kept
    assert [c["function"] for c in calls] == [c["function"] for c in message.get("tool_calls", [])]
    assert all(json.loads(c["function"]["arguments"]) == {"city": "Paris"} for c in calls)


@pytest.mark.parametrize("raw", [
    '[{"name": "get_weather", "arguments": {"city": }}]',  # not JSON
    '{"arguments": {}}',  # no name
    '["get_weather"]',  # not an object
])
def test_malformed_calls_become_content(tekken, raw):
    message = parse_reply(reply_ids(tekken, "Hmm ", raw), tekken)
    assert "tool_calls" not in message
    assert message["content"] == "Hmm " + raw
    stream = ToolCallStream()
    deltas = []
    for t in reply_ids(tekken, "Hmm ", raw):
        deltas += stream.feed(t, tekken.decode([t]))
    deltas += stream.finish()
    # a stream may already have announced a call that is then cut off; the text still arrives
    assert stream.failed and stream.calls == []
    assert "".join(d.get("content", "") for d in deltas) == "Hmm " + raw


def reassemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    """OpenAI streaming deltas -> (content, tool calls), as a client would rebuild them."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for piece in d.get("tool_calls", []):
            c = calls.setdefault(piece["index"], {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
            c["id"] = piece.get("id", c["id"])
            c["type"] = piece.get("type", c["type"])
            c["function"]["name"] += piece.get("function", {}).get("name", "")
            c["function"]["arguments"] += piece.get("function", {}).get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_streaming_parser_matches_whole_reply(tekken, name):
    before, raw = OUTPUTS[name]
    ids = reply_ids(tekken, before, raw)
    stream = ToolCallStream()
    deltas = []
    for t in ids:
        deltas += stream.feed(t, tekken.decode([t]))
    deltas += stream.finish()
    content, calls = reassemble(deltas)
    whole = parse_reply(ids, tekken)
    assert content == before and not stream.failed
    assert len(calls) == len(whole["tool_calls"]) == len(stream.calls)
    # the first delta of each call carries its id, type and name, as OpenAI clients expect
    firsts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [f["index"] for f in firsts] == list(range(len(calls)))
    for got, want, final in zip(calls, whole["tool_calls"], stream.calls):
        assert got["type"] == "function" and got["function"]["name"] == want["function"]["name"]
        assert json.loads(got["function"]["arguments"]) == json.loads(want["function"]["arguments"])
        assert CALL_ID.match(got["id"]) and final["id"] == got["id"]
