"""The native CPU kernels against MLX's own quantized matmul, alone and inside a real model."""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_mistral.generate import generate_step
from mlx_mistral.kernels import _build, cpu
from mlx_mistral.load import load_model

pytestmark = pytest.mark.skipif(_build.compiler() is None, reason="no C compiler to build the native kernels")

# (N, K): Mistral Small 3 projections scaled down 8x (hidden 5120 -> 640, q 4096 -> 512,
# kv 1024 -> 128, intermediate 32768 -> 4096), then shapes no SIMD block divides evenly
MISTRAL_SCALED = [(512, 640), (128, 640), (640, 512), (640, 4096)]
AWKWARD = [(97, 384), (33, 128 * 3), (1, 256), (17, 32 * 5)]


def quantized(n: int, k: int, group_size: int, bits: int, dtype=mx.float32, seed: int = 0):
    w = mx.random.normal((n, k), key=mx.random.key(seed)).astype(dtype)
    return mx.quantize(w, group_size=group_size, bits=bits)  # (w uint32, scales, biases)


def reference(x, w, s, b, group_size, bits):
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group_size, bits=bits)


def rel_err(got: mx.array, want: mx.array) -> float:
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_library_builds_and_loads():
    assert cpu.available(), cpu.describe()
    assert "native CPU kernels" in cpu.describe()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 128])
def test_matches_mlx_on_awkward_shapes(bits, group_size, M):
    for n, k in AWKWARD:
        k = max(group_size, k // group_size * group_size)  # whole groups, often an odd count
        w, s, b = quantized(n, k, group_size, bits, seed=n)
        x = mx.random.normal((M, k), key=mx.random.key(M))
        got = cpu.quantized_matmul(x, w, s, b, group_size=group_size, bits=bits)
        assert got.shape == (M, n) and got.dtype == mx.float32
        assert rel_err(got, reference(x, w, s, b, group_size, bits)) < 1e-5, (n, k)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 4, 9, 128])
def test_matches_mlx_at_scaled_mistral_shapes(group_size, M):
    for n, k in MISTRAL_SCALED:
        w, s, b = quantized(n, k, group_size, 4, dtype=mx.bfloat16, seed=k)  # bf16 scales, as shipped
        x = mx.random.normal((1, M, k), key=mx.random.key(M))  # (B, T, K)
        got = cpu.quantized_matmul(x, w, s, b, group_size=group_size, bits=4)
        assert got.shape == (1, M, n)
        assert rel_err(got, reference(x, w, s, b, group_size, 4)) < 1e-5, (n, k)


@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("x_dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_dtypes(scale_dtype, x_dtype):
    w, s, b = quantized(64, 256, 64, 4, dtype=scale_dtype)
    x = mx.random.normal((3, 256), key=mx.random.key(3)).astype(x_dtype)
    got = cpu.quantized_matmul(x, w, s, b, group_size=64, bits=4)
    want = reference(x.astype(mx.float32), w, s, b.astype(s.dtype), 64, 4)  # the fp32 math we promise
    assert got.dtype == x_dtype
    assert rel_err(got, want) < (1e-5 if x_dtype == mx.float32 else 1e-2)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 3, 128])
def test_gate_up_silu_matches_reference(group_size, M):
    F, K = 256, 640
    w, s, b = quantized(2 * F, K, group_size, 4, seed=group_size)  # [gate rows; up rows]
    x = mx.random.normal((M, K), key=mx.random.key(7))
    gu = reference(x, w, s, b, group_size, 4)
    want = nn.silu(gu[:, :F]) * gu[:, F:]
    got = cpu.gate_up_silu(x, w, s, b, group_size=group_size, bits=4)
    assert got.shape == (M, F)
    assert rel_err(got, want) < 1e-5


@pytest.fixture
def portable_kernels():
    """The kernels non-x86 machines get, forced on this one."""
    lib = cpu._library()[0]
    lib.mm_use_portable(1)
    yield
    lib.mm_use_portable(0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
def test_portable_kernels_match_mlx(portable_kernels, bits, group_size):
    assert "portable C" in cpu.describe()
    for M in (1, 5, 128):
        w, s, b = quantized(97, 3 * group_size, group_size, bits, dtype=mx.float16)
        x = mx.random.normal((M, 3 * group_size), key=mx.random.key(M))
        got = cpu.quantized_matmul(x, w, s, b, group_size=group_size, bits=bits)
        assert rel_err(got, reference(x, w, s, b, group_size, bits)) < 1e-5, M


def test_uncovered_formats_fall_back_to_mlx():
    w, s, b = quantized(64, 256, 64, 3)  # 3-bit: no native kernel
    x = mx.random.normal((2, 256), key=mx.random.key(0))
    got = cpu.quantized_matmul(x, w, s, b, group_size=64, bits=3)
    assert mx.array_equal(got, reference(x, w, s, b, 64, 3))


def test_wrong_feature_count_is_an_error():
    w, s, b = quantized(64, 256, 64, 4)
    with pytest.raises(ValueError, match="features"):
        cpu.quantized_matmul(mx.zeros((1, 128)), w, s, b, group_size=64, bits=4)


def test_disabled_kernels_warn_once_and_stay_correct(monkeypatch):
    monkeypatch.setenv("MLX_MISTRAL_CPU_KERNELS", "0")
    cpu._library.cache_clear()
    cpu._warn_slow_path.cache_clear()
    try:
        assert not cpu.available()
        w, s, b = quantized(64, 256, 64, 4)
        x = mx.random.normal((1, 256), key=mx.random.key(0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                got = cpu.quantized_matmul(x, w, s, b, group_size=64, bits=4)
        assert [str(c.message) for c in caught if "slow CPU path" in str(c.message)] == [
            "mlx-mistral runs quantized matmuls on MLX's slow CPU path: disabled by MLX_MISTRAL_CPU_KERNELS=0"]
        assert mx.array_equal(got, reference(x, w, s, b, 64, 4))
    finally:
        monkeypatch.delenv("MLX_MISTRAL_CPU_KERNELS")
        cpu._library.cache_clear()
        cpu._warn_slow_path.cache_clear()
    assert cpu.available()


def test_smollm2_4bit_logits_and_greedy_tokens_match_mlx(smollm2_dir, monkeypatch):
    """The dispatcher's per-matmul kernels in a real model (fused q/k/v and gate/up, the tied
    head) against plain nn.QuantizedLinear layers on MLX's own op."""
    pair = []
    for fuse in (False, True):
        model = load_model(smollm2_dir, fuse=False)
        nn.quantize(model, group_size=64, bits=4)  # every Linear and the tied embedding
        if fuse:
            model.fuse()  # quantized layers to the dispatcher, which picks the native kernels
        mx.eval(model.parameters())
        pair.append(model)
    monkeypatch.setenv("MLX_MISTRAL_NATIVE_DECODER", "0")  # per matmul here; the decoder: test_native_decoder.py
    ref, ours = pair
    assert type(ref.layers[0].mlp.down_proj) is nn.QuantizedLinear
    assert type(ours.layers[0].mlp.down_proj) is not nn.QuantizedLinear
    short = mx.array([[1, 9690, 198, 2683, 359, 253, 5356, 5646]])
    prompt = mx.array([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                       411, 407, 19712, 8182, 2, 198, 1, 520, 9531, 198])  # 25 ids: prefill takes the GEMM path
    want_logits, got_logits = np.array(ref(short)), np.array(ours(short))
    want_tokens = [t for t, _ in generate_step(prompt, ref, max_tokens=12)]
    got_tokens = [t for t, _ in generate_step(prompt, ours, max_tokens=12)]
    # hidden states reach ~25,000 here: compare against the logits' own scale
    assert np.abs(got_logits - want_logits).max() / np.abs(want_logits).max() < 1e-4
    assert (got_logits.argmax(-1) == want_logits.argmax(-1)).all()
    assert got_tokens == want_tokens
