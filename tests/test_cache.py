"""KV caches: options, long-context prefill, the rotating window, conversation reuse."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_mistral import stream_generate
from mlx_mistral.cache import KEEP, ConversationCache, KVCache, KVSettings, QuantizedKVCache, RotatingKVCache, make_cache
from mlx_mistral.config import ModelArgs
from mlx_mistral.errors import MistralError
from mlx_mistral.generate import generate_step, prefill
from mlx_mistral.model import Model
from mlx_mistral.synth import PRESETS

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def narrow():
    """The tiny shape with 2 query heads: an 8k one-shot forward stays a few seconds on a CPU."""
    mx.random.seed(0)
    args = ModelArgs.from_dict(dict(PRESETS["tiny"], hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=32, vocab_size=512))
    model = Model.from_config(args)
    mx.eval(model.parameters())
    return model


def test_make_cache_kinds(tiny, narrow):
    model, _ = tiny
    assert all(type(c) is KVCache for c in make_cache(model))
    rot = make_cache(model, max_kv_size=64)
    assert all(isinstance(c, RotatingKVCache) and c.max_size == 64 and c.keep == KEEP for c in rot)
    q = make_cache(narrow, kv_bits=4, kv_group_size=32)
    assert all(isinstance(c, QuantizedKVCache) and (c.bits, c.group_size) == (4, 32) for c in q)


@pytest.mark.parametrize("kw, message", [
    (dict(kv_bits=3), "kv_bits"),
    (dict(kv_bits=8, kv_group_size=48), "kv_group_size"),
    (dict(kv_bits=8, kv_group_size=128), "does not divide"),  # tiny's head_dim is 64
    (dict(max_kv_size=KEEP), "max_kv_size"),
    (dict(kv_bits=8, kv_group_size=32, max_kv_size=64), "cannot be quantized"),
])
def test_bad_kv_options_are_clear_errors(tiny, kw, message):
    with pytest.raises(MistralError, match=message):
        make_cache(tiny[0], **kw)


def test_chunked_prefill_equals_one_shot_at_8k(narrow):
    T = 8200  # past 8k, and not a multiple of the chunk
    tokens = mx.random.randint(0, 512, (T,), key=mx.random.key(1))
    one_shot = narrow(tokens[None])[0, -1]  # (vocab,) no cache, one causal forward
    cache = make_cache(narrow)
    prefill(narrow, tokens[:-1], cache, step_size=1024)
    assert cache[0].offset == T - 1
    chunked = narrow(tokens[-1:][None], cache=cache)[0, -1]
    assert mx.allclose(one_shot, chunked, atol=1e-4, rtol=1e-4).item()
    assert one_shot.argmax().item() == chunked.argmax().item()


class WindowCache(KVCache):
    """The rotating cache's contract, written plainly: keep every K/V, but let a new token see
    only the first KEEP tokens and the latest `max_size - KEEP` (itself included)."""

    def __init__(self, max_size: int):
        super().__init__()
        self.max_size = max_size

    def update_and_fetch(self, keys, values):
        keys, values = super().update_and_fetch(keys, values)
        n = keys.shape[2]
        if n <= self.max_size:
            return keys, values
        idx = mx.concatenate([mx.arange(KEEP), mx.arange(n - (self.max_size - KEEP), n)])
        return keys[:, :, idx], values[:, :, idx]


def test_rotating_cache_decodes_as_specified(tiny):
    model, _ = tiny
    size, steps = 32, 100
    rotating = make_cache(model, max_kv_size=size)
    reference = [WindowCache(size) for _ in model.layers]
    tokens = mx.random.randint(0, 8192, (steps,), key=mx.random.key(2))
    for t in range(steps):
        a = model(tokens[t : t + 1][None], cache=rotating)[0, -1]
        b = model(tokens[t : t + 1][None], cache=reference)[0, -1]
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4).item(), f"step {t}"
    assert all(c.offset == steps and c.keys.shape[2] == size for c in rotating)  # memory stays bounded


def test_rotating_cache_bounds_a_long_prompt(tiny):
    model, tok = tiny
    ids = mx.random.randint(1000, 8192, (300,), key=mx.random.key(3))
    cache = make_cache(model, max_kv_size=64)
    out = [t for t, _ in generate_step(ids, model, max_tokens=20, prompt_cache=cache, prefill_step_size=128)]
    assert len(out) == 20
    assert all(c.offset == 300 + 19 and c.keys.shape[2] <= 64 for c in cache)
    # below the bound it is an ordinary cache
    short = ids[:40]
    full = [t for t, _ in generate_step(short, model, max_tokens=10)]
    bounded = [t for t, _ in generate_step(short, model, max_tokens=10, max_kv_size=64)]
    assert full == bounded


def _tokens(model, tok, messages, **kw):
    kw = dict(max_tokens=10, temperature=0, ignore_eos=True, **kw)
    chunks = list(stream_generate(model, tok, messages, **kw))
    return [c.token for c in chunks if c.token is not None], chunks[-1]


def test_conversation_cache_gives_the_tokens_of_a_fresh_run(tiny):
    model, tok = tiny
    conv = ConversationCache(model)
    messages = [{"role": "system", "content": "You answer in one word."}]
    turns = [("What is the capital of France?", None), ("And of Italy?", None),
             ("What is the weather in Rome?", TOOLS),  # [AVAILABLE_TOOLS] lands before this message
             ("Thanks. And Madrid?", None)]
    tools_at = None  # where [AVAILABLE_TOOLS] (id 5) went in the previous prompt
    for n, (text, tools) in enumerate(turns):
        messages.append({"role": "user", "content": text})
        ids = tok.encode_chat(messages, tools=tools)
        held = len(conv)
        fresh, _ = _tokens(model, tok, messages, tools=tools)
        reused, last = _tokens(model, tok, messages, tools=tools, prompt_cache=conv)
        assert reused == fresh, f"turn {n}"
        assert last.prompt_tokens == len(ids) and last.cached_tokens <= held
        if n == 0:
            assert last.cached_tokens == 0
        elif tools_at is not None:  # the tools block moved on to the new last user message:
            assert 0 < last.cached_tokens <= tools_at < held  # the cache was cut where it was
        else:  # the whole previous prompt is reused
            assert last.cached_tokens >= len(previous)
        assert len(conv) == conv.cache[0].offset and conv.tokens == (ids + reused)[: len(conv)]
        messages.append({"role": "assistant", "content": tok.decode(reused)})
        previous, tools_at = ids, (ids.index(5) if tools else None)


def test_conversation_cache_recovers_from_an_early_stop(tiny):
    model, tok = tiny
    conv = ConversationCache(model)
    messages = [{"role": "user", "content": "Tell me a story."}]
    stream = stream_generate(model, tok, messages, max_tokens=30, temperature=0, prompt_cache=conv)
    next(stream), next(stream)
    stream.close()  # a reader that stops early (Ctrl-C in the chat)
    assert len(conv) == conv.cache[0].offset > 0
    again, last = _tokens(model, tok, messages, prompt_cache=conv)
    assert again == _tokens(model, tok, messages)[0]
    assert last.cached_tokens == len(tok.encode_chat(messages)) - 1


def test_conversation_cache_with_quantized_and_rotating_kv(narrow):
    ids = list(range(10, 110))
    for kw in (dict(kv_bits=8, kv_group_size=32), dict(max_kv_size=64)):
        conv = ConversationCache(narrow, **kw)
        assert conv.reuse(ids[:50]) == 0
        first = [t for t, _ in generate_step(mx.array(ids[:50]), narrow, max_tokens=5, prompt_cache=conv.cache)]
        conv.record(ids[:50] + first)
        assert len(conv) == 54  # the last sampled id is not fed back
        cached = conv.reuse(ids)
        assert cached >= 50 and conv.cache[0].offset == cached  # trimmed to the common prefix
        rest = [t for t, _ in generate_step(mx.array(ids[cached:]), narrow, max_tokens=5, prompt_cache=conv.cache)]
        fresh = [t for t, _ in generate_step(mx.array(ids), narrow, max_tokens=5, **kw)]
        assert rest == fresh


def test_wrapped_rotating_cache_starts_over(narrow):
    conv = ConversationCache(narrow, max_kv_size=32)
    ids = list(range(10, 90))
    out = [t for t, _ in generate_step(mx.array(ids), narrow, max_tokens=3, prompt_cache=conv.cache)]
    conv.record(ids + out)
    assert len(conv) == 82
    other = ids[:40] + [5, 6, 7]  # a prefix the wrapped window no longer holds in order
    assert conv.reuse(other) == 0 and len(conv) == 0 and conv.cache[0].offset == 0


def test_conversation_cache_refuses_other_kv_settings(tiny):
    conv = ConversationCache(tiny[0], max_kv_size=64)
    with pytest.raises(MistralError, match="prompt cache holds"):
        list(stream_generate(*tiny, "Hi", max_tokens=2, prompt_cache=conv, max_kv_size=128))
    assert conv.settings == KVSettings(max_kv_size=64)


@pytest.mark.parametrize("kv_bits, group_size", [(8, 32), (8, 64), (4, 32), (4, 64)])
def test_the_tiny_preset_takes_quantized_kv(tiny, kv_bits, group_size):
    """synth's tiny preset is for trying every feature offline: its head_dim (64) fits the KV groups."""
    model, _ = tiny
    cache = make_cache(model, kv_bits=kv_bits, kv_group_size=group_size)
    logits = model(mx.array([[1, 5, 9, 13]]), cache=cache)
    assert cache[0].offset == 4 and mx.isfinite(logits).all().item()
