"""Quantized KV on SmolLM2-135M-Instruct real weights: 8-bit keeps greedy decoding, 4-bit is close."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_mistral.cache import make_cache
from mlx_mistral.generate import generate_step

STORY = ("Write a long story about a lighthouse keeper who finds a message in a bottle. "
         "Describe the sea, the weather and the town in detail.")
N = 40  # greedy tokens; measured on this prompt: 8-bit KV agrees for the first 42, 4-bit for 14


@pytest.fixture(scope="module")
def smollm2_greedy(smollm2):
    model, tok = smollm2
    ids = tok.encode_chat([{"role": "user", "content": STORY}])
    greedy = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=N)]
    fp = teacher_forced(model, ids, greedy)
    mx.eval(fp)
    return model, ids, greedy, fp


def teacher_forced(model, ids, greedy, **kv):
    """Log-probabilities at each greedy position with the cache kind `kv` (one forward pass:
    a quantized cache quantizes the keys before attention reads them, as in decoding)."""
    seq = mx.array(ids + greedy)[None]
    logits = model(seq, cache=make_cache(model, **kv))[0, len(ids) - 1 : -1]  # (N, vocab)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def compare(model, ids, greedy, fp, **kv):
    q = teacher_forced(model, ids, greedy, **kv)
    kl = (mx.exp(fp) * (fp - q)).sum(axis=-1)  # KL(fp || quantized) per position
    agree = (q.argmax(axis=-1) == mx.array(greedy)).astype(mx.float32)
    return agree, kl


def test_8bit_kv_keeps_the_greedy_tokens(smollm2_greedy):
    agree, kl = compare(*smollm2_greedy, kv_bits=8, kv_group_size=64)
    print(f"8-bit KV: top-1 agreement {agree.mean().item():.3f}, KL mean {kl.mean().item():.2e} max {kl.max().item():.2e}")
    assert agree.min().item() == 1.0  # every greedy step picks the same token
    assert kl.mean().item() < 5e-3


def test_4bit_kv_is_close(smollm2_greedy):
    agree, kl = compare(*smollm2_greedy, kv_bits=4, kv_group_size=64)
    print(f"4-bit KV: top-1 agreement {agree.mean().item():.3f}, KL mean {kl.mean().item():.3f} max {kl.max().item():.3f}")
    assert agree.mean().item() >= 0.6
    assert 5e-3 < kl.mean().item() < 0.5  # measurably further from full precision than 8-bit
