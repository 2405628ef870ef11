"""The native CPU kernels against MLX's own quantized matmul, alone and inside a real model."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

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


@pytest.fixture(autouse=True)
def float_activations():
    """The fp32-activation kernels (the 1e-5 parity below); the int8 ones are tested on their own."""
    lib = cpu._library()[0]
    before = lib.mm_int8()
    lib.mm_use_int8(0)
    yield lib
    lib.mm_use_int8(before)


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


# ---- the int8-activation GEMV (cpu_q8.h): exact on the rounded x, bounded against MLX ----------

def rounded_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x rounded as the kernel does (int8 per block of 32: q = rint(x * 127/max|x|), step max|x|/127,
    in fp32), and each element's step."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    step = (amax / np.float32(127)).astype(np.float32)
    return (np.rint(blocks * inv) * step).reshape(x.shape), np.broadcast_to(step, blocks.shape).reshape(x.shape)


@pytest.fixture(params=["avx2", "512-bit", "avx2 vnni", "512-bit vnni"])
def int8_activations(float_activations, request):
    """Each int8 GEMV in turn: the AVX2 one (cpu_q8.h) and the 512-bit one (cpu_q8w.h, K % 128 == 0),
    each with maddubs/madd and with vpdpbusd (AVX512-VNNI)."""
    lib = float_activations
    if lib.mm_simd() < 2:
        pytest.skip("no AVX2 on this machine")
    wide, vnni = request.param.startswith("512-bit"), request.param.endswith("vnni")
    wide_before, vnni_before = lib.mm_int8_wide(), lib.mm_vnni()
    lib.mm_use_int8(1)
    lib.mm_use_int8_wide(wide)
    lib.mm_use_vnni(vnni)
    try:
        if wide and not lib.mm_int8_wide():
            pytest.skip("no AVX-512BW on this machine")
        if vnni and not lib.mm_vnni():
            pytest.skip("no AVX512-VNNI on this machine")
        assert "int8 activations" in cpu.describe()
        assert ("512-bit" in cpu.describe()) == wide
        assert ("VNNI" in cpu.describe()) == vnni
        yield
    finally:
        lib.mm_use_int8(0)
        lib.mm_use_int8_wide(wide_before)
        lib.mm_use_vnni(vnni_before)


@pytest.mark.parametrize("scale_dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 32])
def test_int8_gemv_is_exact_on_rounded_x_and_bounded_against_mlx(int8_activations, scale_dtype, group_size, M):
    """The bound: y~ = dequant(W) . round8(x) to fp32 accuracy, so |y~ - y| <= sum_k |W_nk| step_k / 2.
    K = 192 and 640 are no multiples of 128: the 512-bit kernel's fallback to the AVX2 one."""
    for n, k in [(97, 640), (1, 128), (33, 4096), (17, 192), (16, 1280)]:
        k = max(group_size, 64, k // max(group_size, 64) * max(group_size, 64))
        w, s, b = quantized(n, k, group_size, 4, dtype=scale_dtype, seed=n)
        x = mx.random.normal((M, k), key=mx.random.key(k))
        got = np.array(cpu.quantized_matmul(x, w, s, b, group_size=group_size, bits=4))
        dense = np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=4))
        xr, step = rounded_x(np.array(x))
        assert scaled_err_np(got, xr @ dense.T) < 1e-5, (n, k)
        want = np.array(reference(x, w, s, b, group_size, 4))
        bound = 0.5 * (step @ np.abs(dense).T)  # (M, n)
        assert (np.abs(got - want) <= bound + 1e-5 * np.abs(want).max()).all(), (n, k)
        assert scaled_err_np(got, want) < 3e-2, (n, k)  # the bound's size on normal data


@pytest.mark.parametrize("wide", [0, 1])
def test_vnni_int8_gemv_is_bit_identical_to_maddubs(float_activations, wide):
    """vpdpbusd sums the same int32 lanes maddubs/madd do (no int16 saturation with 4-bit weights)."""
    lib = float_activations
    vnni_before, wide_before = lib.mm_vnni(), lib.mm_int8_wide()
    lib.mm_use_int8(1)
    lib.mm_use_int8_wide(wide)
    lib.mm_use_vnni(1)
    try:
        if not lib.mm_vnni() or lib.mm_int8_wide() != wide:
            pytest.skip("no AVX512-VNNI (or AVX-512BW) on this machine")
        for M, gs in [(1, 64), (3, 32), (8, 128)]:
            w, s, b = quantized(96, 1280, gs, 4, dtype=mx.bfloat16, seed=M)
            x = mx.random.normal((M, 1280), key=mx.random.key(M)) * 4  # large x: the most int8 range used
            lib.mm_use_vnni(1)
            with_vnni = np.array(cpu.quantized_matmul(x, w, s, b, group_size=gs, bits=4))
            lib.mm_use_vnni(0)
            without = np.array(cpu.quantized_matmul(x, w, s, b, group_size=gs, bits=4))
            assert np.array_equal(with_vnni, without), (M, gs)
    finally:
        lib.mm_use_int8(0)
        lib.mm_use_int8_wide(wide_before)
        lib.mm_use_vnni(vnni_before)


def test_x86_default_is_int8_activations_with_vnni_where_present(tmp_path):
    """With AVX2 (AVX-512 CPUs included) a fresh process takes the int8 GEMV, with VNNI where the CPU
    has it; MLX_MISTRAL_INT8=0 and MLX_MISTRAL_VNNI=0 turn each off."""
    lib = cpu._library()[0]
    if lib.mm_simd() < 2:
        pytest.skip("no AVX2 on this machine")
    code = "from mlx_mistral.kernels import cpu; print(cpu.describe())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_MISTRAL_")}

    def describe(**extra):
        run = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout

    default = describe()
    assert "int8 activations" in default and "from 2 rows" not in default
    info = Path("/proc/cpuinfo")
    if info.exists():  # Linux: the kernel's own flags say whether VNNI (EVEX, so AVX-512 BW/VL too) exists
        flags = set(next(line for line in info.read_text().splitlines() if line.startswith("flags")).split())
        assert ("VNNI" in default) == ({"avx512_vnni", "avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags)
    assert "int8 activations" not in describe(MLX_MISTRAL_INT8="0")
    assert "VNNI" not in describe(MLX_MISTRAL_VNNI="0")
    assert "VNNI" not in describe(MLX_MISTRAL_NO_AVX512="1")  # its EVEX form is AVX-512


def scaled_err_np(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_int8_gemv_skips_what_it_does_not_cover(int8_activations):
    """8-bit weights, K not a multiple of 64, and M above the multi-row limit keep the fp32 kernels."""
    for bits, k, M in [(8, 256, 1), (4, 32 * 5, 1), (4, 256, 33)]:
        w, s, b = quantized(40, k, 32, bits)
        x = mx.random.normal((M, k), key=mx.random.key(1))
        got = cpu.quantized_matmul(x, w, s, b, group_size=32, bits=bits)
        assert rel_err(got, reference(x, w, s, b, 32, bits)) < 1e-5, (bits, k, M)


def test_int8_gemv_multi_matrix_call_matches_single_calls(int8_activations):
    """mm_qmm_multi (q/k/v, gate/up in one job) shares the rounded x between its matrices."""
    import ctypes

    lib = cpu._library()[0]
    K, Ns = 1280, [512, 128, 128]  # K % 128 == 0: the 512-bit kernel too
    mats = [cpu.Packed(*quantized(n, K, 64, 4, dtype=mx.bfloat16, seed=n + i), 64, 4) for i, n in enumerate(Ns)]
    x = np.random.default_rng(0).standard_normal((3, K)).astype(np.float32)
    ys = [np.empty((3, n), np.float32) for n in Ns]
    ptrs = lambda vals: (ctypes.c_void_p * 3)(*vals)  # noqa: E731
    rc = lib.mm_qmm_multi(x.ctypes.data, 3, K, 3, ptrs([m.w for m in mats]), ptrs([m.scales for m in mats]),
                          ptrs([m.biases for m in mats]), (ctypes.c_int64 * 3)(*Ns), mats[0].dtype, 64, 4,
                          (ctypes.c_void_p * 3)(*[y.ctypes.data for y in ys]))
    assert rc == 0
    for m, y in zip(mats, ys):
        assert np.array_equal(y, np.array(m(mx.array(x))))


def test_int8_gemv_two_rows_and_up_mode(float_activations):
    """mm_use_int8(2): int8 activations from two rows on; one row stays on the float kernels (1e-5)."""
    lib = float_activations
    if lib.mm_simd() < 2:
        pytest.skip("no AVX2 on this machine")
    lib.mm_use_int8(2)
    try:
        assert "from 2 rows" in cpu.describe()
        w, s, b = quantized(40, 1280, 64, 4, dtype=mx.bfloat16)
        x = mx.random.normal((2, 1280), key=mx.random.key(3))
        one = cpu.quantized_matmul(x[:1], w, s, b, group_size=64, bits=4)
        assert rel_err(one, reference(x[:1], w, s, b, 64, 4)) < 1e-5
        two = np.array(cpu.quantized_matmul(x, w, s, b, group_size=64, bits=4))
        dense = np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=4))
        assert scaled_err_np(two, rounded_x(np.array(x))[0] @ dense.T) < 1e-5
        assert rel_err(mx.array(two), reference(x, w, s, b, 64, 4)) > 1e-6  # the rounded x, not x
    finally:
        lib.mm_use_int8(0)
