"""Reply shaping (content / tool calls) and prefix reuse of the server, piece by piece and end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx.core as mx
import httpx
import pytest
from live_server import LiveServer
from mlx_lm.models.cache import KVCache

from mlx_mistral.server import create_app
from mlx_mistral.server import ReplyAssembler

TOOL_CALLS = 9


# -- reply assembly -------------------------------------------------------------------------------

def test_assembler_splits_content_from_calls_on_the_token(tekken):
    reply = ReplyAssembler(tekken)
    streamed = [reply.feed("Let me check. ", 100), reply.feed("", TOOL_CALLS),
                reply.feed('[{"name": "f", ', 101), reply.feed('"arguments": {"q": "a"}}]', 102), reply.feed("", None)]
    assert streamed[:3] == [[{"content": "Let me check. "}], [], []]  # a call streams once it is whole
    call_id = streamed[3][0]["tool_calls"][0]["id"]
    assert streamed[3] == [{"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                            "function": {"name": "f", "arguments": '{"q": "a"}'}}]}]
    assert reply.finish("stop") == ([], "tool_calls")
    message = reply.message()
    assert message["content"] == "Let me check." and message["tool_calls"] == [
        {"id": call_id, "type": "function", "function": {"name": "f", "arguments": '{"q": "a"}'}}]


def test_a_cut_off_call_is_dropped_and_the_complete_ones_kept(tekken):
    reply = ReplyAssembler(tekken)
    reply.feed("", TOOL_CALLS)
    first = reply.feed('[{"name": "f", "arguments": {"q": "a"}}, ', 101)
    assert reply.feed('{"name": "g", "argu', 102) == []  # the unfinished call never streams
    assert reply.finish("length") == ([], "length")
    call = first[0]["tool_calls"][0]
    assert reply.message() == {"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": "f", "arguments": '{"q": "a"}'}}]}


def test_a_call_cut_before_it_closed_leaves_no_raw_text(tekken):
    reply = ReplyAssembler(tekken)
    reply.feed("", TOOL_CALLS)
    reply.feed('[{"name": "f", "argu', 101)
    assert reply.finish("length") == ([], "length")
    assert reply.message() == {"role": "assistant", "content": ""}


def test_plain_reply_and_tokenizers_without_tool_calls(tekken):
    no_marker = SimpleNamespace(mistral=None)  # e.g. a Hugging Face tokenizer: id 9 is ordinary text
    for tok in (tekken, no_marker):
        reply = ReplyAssembler(tok)
        for piece, token in (("Hello", 5), (" world", TOOL_CALLS if tok is no_marker else 5)):
            assert reply.feed(piece, token) == [{"content": piece}]
        assert reply.finish("length") == ([], "length")
        assert reply.message() == {"role": "assistant", "content": "Hello world"}


# -- tool calls end to end, with a model that follows a script --------------------------------------

class ScriptedModel:
    """Answers a user turn with `on_user` and a tool result with `on_result` (token ids), then
    `</s>`, whatever else the prompt says: it drives the server through replies a random model
    never produces."""

    def __init__(self, tokenizer, on_user: list[int], on_result: list[int]):
        self.tok = tokenizer
        self.replies = {tokenizer.tekken.get_special_token("[/INST]"): on_user,
                        tokenizer.tekken.get_special_token("[/TOOL_RESULTS]"): on_result}
        self.eos = tokenizer.tekken.eos_id
        self.args = SimpleNamespace(max_position_embeddings=4096, head_dim=1, vocab_size=tokenizer.vocab_size)
        self.layers = [None]

    def make_cache(self):
        return [KVCache()]

    def native_decoder(self):  # the engine asks each model; a script runs on MLX
        return None

    def __call__(self, tokens, cache):
        layer = cache[0]
        history = getattr(layer, "history", [])[: layer.offset] + tokens[0].tolist()
        layer.history = history
        layer.update_and_fetch(mx.zeros((1, 1, tokens.shape[1], 1)), mx.zeros((1, 1, tokens.shape[1], 1)))
        ends = [i for i, t in enumerate(history) if t in self.replies]
        if not ends:  # prefill of the prompt's start: these logits are never read
            return mx.zeros((1, tokens.shape[1], self.tok.vocab_size))
        turn_end = ends[-1]
        reply = self.replies[history[turn_end]] + [self.eos]
        step = len(history) - turn_end - 1
        next_id = reply[min(step, len(reply) - 1)]
        row = mx.where(mx.arange(self.tok.vocab_size) == next_id, 30.0, 0.0)
        return mx.broadcast_to(row, (1, tokens.shape[1], self.tok.vocab_size))


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def scripted(tekken):
    call = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    model = ScriptedModel(tekken, [TOOL_CALLS] + tekken.encode(call, bos=False),
                          tekken.encode("It is sunny in Paris.", bos=False))
    with LiveServer(create_app(model, tekken, model_id="scripted")) as server:
        yield server


def test_tool_call_round_trip_with_the_openai_client(scripted):
    client = scripted.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER],
                                       tool_choice="required", max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
    r2 = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER], max_tokens=64)
    assert r2.choices[0].message.content == "It is sunny in Paris."
    assert r2.choices[0].finish_reason == "stop"
    assert r2.usage.prompt_tokens_details.cached_tokens > 0  # the call turn's KV was kept


def test_streamed_tool_call(scripted):
    stream = scripted.client().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], max_tokens=64,
        stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    assert not "".join(d.content or "" for d in deltas)  # the call text is not streamed as content
    pieces = [tc for d in deltas for tc in (d.tool_calls or [])]
    # a call streams once it is complete, so a reply cut by max_tokens never shows half a call
    assert len(pieces) == 1 and pieces[0].index == 0 and len(pieces[0].id) == 9
    assert pieces[0].function.name == "get_weather"
    assert json.loads(pieces[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_forbids_the_call_the_model_wants(scripted):
    r = scripted.client().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
        tool_choice="none", max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None
    assert r.usage.completion_tokens == 8  # the scripted [TOOL_CALLS] never came: another token did


def test_a_call_without_declared_tools_is_parsed_as_given(scripted):
    # no tools, so nothing is enforced: the scripted call text is still read as a call
    r = scripted.client().chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Weather?"}], max_tokens=64)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


class BreaksOnce(ScriptedModel):
    """Raises on its first call, as a model running out of memory would."""

    broken = False

    def __call__(self, tokens, cache):
        if not self.broken:
            self.broken = True
            raise RuntimeError("out of memory")
        return super().__call__(tokens, cache)


def test_a_failed_generation_is_a_server_error_and_the_worker_survives(tekken):
    model = BreaksOnce(tekken, tekken.encode("fine", bos=False), [])
    with LiveServer(create_app(model, tekken, model_id="m")) as server:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "out of memory" in r.json()["error"]["message"]
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"


def test_prefix_reuse_can_be_turned_off(tekken):
    model = ScriptedModel(tekken, tekken.encode("fine", bos=False), [])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cached = {}
    for reuse in (True, False):
        with LiveServer(create_app(model, tekken, model_id="m", prefix_cache=reuse)) as server:
            for _ in range(2):
                r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
            assert r["choices"][0]["message"]["content"] == "fine"
            cached[reuse] = r["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached[True] == r["usage"]["prompt_tokens"] - 1 and cached[False] == 0
