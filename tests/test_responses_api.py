"""POST /v1/responses driven by the official openai client (responses.create and .stream) on a
random model: replies are checked for validity, not for text."""

from __future__ import annotations

import json

import httpx
import pytest

from live_server import WAIT_S, LiveServer
from mlx_mistral.server import create_app

MODEL = "tiny"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ANSWER = {"format": {"type": "json_schema", "name": "answer", "strict": True, "schema": {
    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def live(tiny):
    with LiveServer(create_app(*tiny, model_id=MODEL)) as server:
        yield server


def test_plain_text_response(live):
    r = live.client().responses.create(model=MODEL, input="Hello", instructions="Be brief.", max_output_tokens=6)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens <= 6
    assert r.output[0].type == "message" and r.output_text == r.output[0].content[0].text
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_forced_function_call_and_round_trip(live):
    client = live.client()
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Weather in Paris?"}],
                                tools=[WEATHER], tool_choice="required", max_output_tokens=200)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and all(c.name == "get_weather" for c in calls)
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    follow = [{"role": "user", "content": "Weather in Paris?"}] + [c.model_dump() for c in calls] + [
        {"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls]
    r2 = client.responses.create(model=MODEL, input=follow, tools=[WEATHER], tool_choice="none",
                                 max_output_tokens=5)
    assert r2.output[0].type == "message" and r2.status in ("completed", "incomplete")


def test_named_tool_choice_is_one_call(live):
    r = live.client().responses.create(model=MODEL, input="Weather?", tools=[WEATHER], max_output_tokens=200,
                                       tool_choice={"type": "function", "name": "get_weather"})
    assert [o.type for o in r.output] == ["function_call"]


def test_json_schema_text_format(live):
    r = live.client().responses.create(model=MODEL, input="Answer", text=ANSWER, max_output_tokens=60)
    assert isinstance(json.loads(r.output_text)["ok"], bool)


def test_previous_response_id_continues_the_conversation(live):
    client = live.client()
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=4)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=4)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first turn's KV was reused
    r = httpx.post(f"{live.url}/v1/responses", json={"input": "x", "previous_response_id": "resp_nope"},
                   timeout=WAIT_S)
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"


def test_streamed_text_matches_the_documented_events(live):
    with live.client().responses.stream(model=MODEL, input="Hello", max_output_tokens=6, temperature=0) as stream:
        events = list(stream)
    final = events[-1].response  # a reply cut by max_output_tokens ends in response.incomplete
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text
    whole = live.client().responses.create(model=MODEL, input="Hello", max_output_tokens=6, temperature=0)
    assert whole.output_text == text


def test_streamed_function_call(live):
    with live.client().responses.stream(model=MODEL, input="Weather?", tools=[WEATHER], tool_choice="required",
                                        max_output_tokens=200) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    calls = [o for o in final.output if o.type == "function_call"]
    assert args == "".join(c.arguments for c in calls)
    assert all(isinstance(json.loads(c.arguments)["city"], str) for c in calls)


def test_unsupported_items_are_a_400(live):
    for body in ({"input": "x", "tools": [{"type": "web_search"}]},
                 {"input": [{"type": "image_generation_call"}]}):
        r = httpx.post(f"{live.url}/v1/responses", json=body, timeout=WAIT_S)
        assert r.status_code == 400 and r.json()["error"]["message"]
