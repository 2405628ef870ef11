"""Request fields agent frameworks send: logprobs, logit_bias, penalties, echo, and forced calls
with a JSON response_format or a tight max_tokens, against a live server on a random model."""

from __future__ import annotations

import json

import httpx
import pytest

from live_server import WAIT_S, LiveServer
from mlx_mistral.budget import minimal_call_tokens
from mlx_mistral.server import create_app

MODEL = "tiny"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
ANSWER = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}


@pytest.fixture(scope="module")
def live(tiny):
    with LiveServer(create_app(*tiny, model_id=MODEL)) as server:
        server.model = tiny
        yield server


def user(text):
    return [{"role": "user", "content": text}]


def post(live, path, **body):
    return httpx.post(f"{live.url}/v1/{path}", json={"model": MODEL, **body}, timeout=WAIT_S)


def test_chat_logprobs(live):
    r = live.client().chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_streamed_chat_logprobs_match_the_whole_reply(live):
    kw = dict(model=MODEL, messages=user("Hi"), max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    whole = live.client().chat.completions.create(**kw).choices[0].logprobs.content
    chunks = [c for c in live.client().chat.completions.create(stream=True, **kw) if c.choices]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 3)) for e in streamed] == [(e.token, round(e.logprob, 3)) for e in whole]


def test_no_logprobs_unless_asked(live):
    r = live.client().chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=2)
    assert r.choices[0].logprobs is None


def test_completion_logprobs_and_echo(live):
    r = post(live, "completions", prompt="Once upon", max_tokens=4, temperature=0, logprobs=2).json()
    lp = r["choices"][0]["logprobs"]
    n = r["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert all(len(t) <= 2 for t in lp["top_logprobs"]) and lp["text_offset"] == sorted(lp["text_offset"])
    echoed = post(live, "completions", prompt="Once upon", max_tokens=4, temperature=0, echo=True).json()
    assert echoed["choices"][0]["text"] == "Once upon" + r["choices"][0]["text"]
    refused = post(live, "completions", prompt="Once upon", max_tokens=4, echo=True, logprobs=1)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "echo"


def test_logit_bias_and_penalties(live):
    _, tok = live.model
    target = tok.encode("hello", bos=False)[0]
    r = post(live, "completions", prompt="x", max_tokens=3, temperature=0, logit_bias={str(target): 100},
             presence_penalty=0.0, frequency_penalty=0.0).json()
    assert r["choices"][0]["text"] == tok.decode([target] * 3)
    # the penalties count the repeated token: its logprob drops once it has been generated
    kw = dict(prompt="x", max_tokens=2, temperature=0, logprobs=0, logit_bias={str(target): 8})
    plain = post(live, "completions", **kw).json()["choices"][0]["logprobs"]
    penalized = post(live, "completions", frequency_penalty=2.0, presence_penalty=2.0, **kw).json()
    assert plain["tokens"][0] == penalized["choices"][0]["logprobs"]["tokens"][0]
    if plain["tokens"][1] == plain["tokens"][0]:
        assert penalized["choices"][0]["logprobs"]["token_logprobs"][1] < plain["token_logprobs"][1]
    for bad in ({"abc": 1}, {str(target): 101}, {str(10**9): 1}):
        assert post(live, "completions", prompt="x", max_tokens=1, logit_bias=bad).status_code == 400
    assert post(live, "chat/completions", messages=user("x"), max_tokens=1, presence_penalty=3).status_code == 400


def test_a_forced_call_wins_over_a_json_response_format(live):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = post(live, "chat/completions", messages=user("Weather?"), tools=[WEATHER, PING], tool_choice=choice,
                 response_format=ANSWER, max_tokens=200, temperature=1.0, seed=3)
        assert r.status_code == 200, r.text
        choice_out = r.json()["choices"][0]
        assert choice_out["finish_reason"] == "tool_calls" and choice_out["message"]["tool_calls"]
    # without a forced call the reply follows the format
    r = post(live, "chat/completions", messages=user("Weather?"), tools=[WEATHER], tool_choice="none",
             response_format=ANSWER, max_tokens=60, seed=3).json()
    assert isinstance(json.loads(r["choices"][0]["message"]["content"])["ok"], bool)


@pytest.mark.parametrize("seed", range(4))
def test_a_named_choice_is_exactly_one_call(live, seed):
    r = post(live, "chat/completions", messages=user("Weather?"), tools=[WEATHER, PING], max_tokens=300,
             tool_choice={"type": "function", "function": {"name": "ping"}}, temperature=1.0, seed=seed).json()
    calls = r["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["ping"]


def test_a_budget_below_one_call_is_a_400(live):
    r = post(live, "chat/completions", messages=user("Weather?"), tools=[WEATHER], tool_choice="required",
             max_tokens=3)
    assert r.status_code == 400 and "cannot hold one complete call" in r.json()["error"]["message"]


@pytest.mark.parametrize("seed", range(3))
def test_a_cut_call_is_the_same_streamed_and_whole(live, seed):
    # the schema's own minLength outgrows the budget, so the sizing cannot save the call
    long_city = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "minLength": 40}}, "required": ["city"]}}}
    need = minimal_call_tokens(live.model[1], long_city)
    kw = dict(messages=user("Weather?"), tools=[long_city], tool_choice="required", max_tokens=need + 2,
              temperature=1.0, seed=seed)
    whole = post(live, "chat/completions", **kw).json()["choices"][0]
    assert whole["finish_reason"] in ("length", "tool_calls")
    lines = httpx.post(f"{live.url}/v1/chat/completions", json={"model": MODEL, "stream": True, **kw},
                       timeout=WAIT_S).text.splitlines()
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert "[TOOL_CALLS]" not in content and '"arguments"' not in content
    assert content == (whole["message"]["content"] or "")
    assert [c["function"] for c in calls] == [c["function"] for c in whole["message"].get("tool_calls", [])]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_serve_takes_the_value_bounds_as_options(monkeypatch):
    from click.testing import CliRunner

    from mlx_mistral.cli.serving import serve

    seen = {}
    monkeypatch.setattr("mlx_mistral.server.serve", lambda model, **kw: seen.update(kw))
    r = CliRunner().invoke(serve, ["-m", "x", "--limit-string", "9", "--limit-items", "2", "--limit-digits", "3",
                                   "--limit-calls", "1"])
    assert r.exit_code == 0, r.output
    limits = seen["limits"]
    assert (limits.max_string, limits.max_items, limits.max_abs_number, limits.max_calls) == (9, 2, 1000, 1)
    assert CliRunner().invoke(serve, ["-m", "x", "--limit-string", "0"]).exit_code == 2


def test_n_replies_are_one_batch(live):
    r = live.client().chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=4, n=3,
                                              temperature=1.0, seed=1, logprobs=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    stream = live.client().chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=4, n=2,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1] and chunks[-1].usage.completion_tokens > 0
    cmpl = post(live, "completions", prompt="x", max_tokens=3, n=2, temperature=0).json()
    assert [c["index"] for c in cmpl["choices"]] == [0, 1]
    assert cmpl["choices"][0]["text"] == cmpl["choices"][1]["text"]  # greedy: the same reply twice
    r = post(live, "chat/completions", messages=user("Hi"), n=64)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
