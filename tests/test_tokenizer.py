"""Tekken V7 chat encoding against mistral-common, and streaming detokenization."""

from __future__ import annotations

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from mlx_mistral.errors import MistralError

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "Hi"}],
    "multi_turn": [{"role": "system", "content": "Be kind."},
                   {"role": "user", "content": "Hello"},
                   {"role": "assistant", "content": "Hi! How can I help?"},
                   {"role": "user", "content": "Tell me a joke."}],
    "multilingual": [{"role": "user", "content": "Ça va ? Größe, 日本語のテキスト, 😀🎉, Привет, مرحبا"}],
    "tool_result": [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "abcDEF123", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "abcDEF123", "content": "{\"temp_c\": 21}"}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_encode_chat_equals_mistral_common(tekken, name):
    messages = CONVERSATIONS[name]
    tools = TOOLS if name == "tool_result" else None
    expected = tekken.mistral.encode_chat_completion(
        ChatCompletionRequest.from_openai(messages=messages, tools=tools)).tokens
    assert tekken.encode_chat(messages, tools=tools) == expected


def test_v7_system_prompt_layout(tekken):
    ids = tekken.encode_chat(CONVERSATIONS["system"])
    assert ids[:2] == [1, 17]  # <s>[SYSTEM_PROMPT]
    assert 18 in ids and ids[ids.index(18) + 1] == 3  # [/SYSTEM_PROMPT][INST]
    assert ids[-1] == 4  # [/INST]


def test_tools_come_before_last_user_message(tekken):
    messages = CONVERSATIONS["multi_turn"]
    ids = tekken.encode_chat(messages, tools=TOOLS)
    assert ids.count(5) == 1  # [AVAILABLE_TOOLS]
    assert ids.index(5) > max(i for i, t in enumerate(ids[:-1]) if t == 4 and i < ids.index(5))


def test_invalid_conversation_is_a_clear_error(tekken):
    with pytest.raises(MistralError, match="invalid chat request"):
        tekken.encode_chat([{"role": "wizard", "content": "hi"}])


MIXED = "Déjà vu — naïve façade; 北京欢迎你; 🙂👍🏽🇫🇷; Ελληνικά; हिन्दी; ok."


def test_streaming_detokenizer_joins_to_full_decode(tekken):
    ids = tekken.encode(MIXED, bos=False)
    detok = tekken.detokenizer()
    pieces = [detok.add_token(t) for t in ids] + [detok.finalize()]
    assert "".join(pieces) == tekken.decode(ids) == MIXED
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_detokenizer_holds_back_split_characters(tekken):
    text = "😀🎉"
    ids = tekken.encode(text, bos=False)
    assert any(not tekken.tekken.id_to_byte_piece(t).decode("utf-8", "ignore") for t in ids), \
        "the test needs a character spread over several byte tokens"
    detok = tekken.detokenizer()
    out = [detok.add_token(t) for t in ids]
    assert "" in out  # a partial character was held back, not emitted as U+FFFD
    assert all("\ufffd" not in p for p in out)
    assert "".join(out) + detok.finalize() == text


def test_hf_tokenizer_fallback_streams_too(smollm2_dir):
    from mlx_mistral.tokenizer import HFTokenizer, load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode(MIXED, bos=False)
    detok = tok.detokenizer()
    assert "".join(detok.add_token(t) for t in ids) + detok.finalize() == tok.decode(ids)
