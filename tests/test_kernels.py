"""Quantized matmul kernels: the reference algorithm, the dispatcher, fused layers and the fused
model, each against mx.quantized_matmul / the unfused model; Metal and CUDA runs are gated."""

from __future__ import annotations

import re
import shutil
import subprocess
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_mistral.kernels import cuda, dispatch, gpu, metal, reference
from mlx_mistral.kernels.layers import DispatchedQuantizedLinear, FusedGateUp, FusedLinear, concat_linears
from mlx_mistral.load import load_model

# The 24B model's projections with every dimension divided by 8 (vocabulary by 16). 640 is no
# multiple of the 512-wide kernel step, so the tail path runs too.
SHAPES = {  # name: (K, N)
    "qkv": (640, 512 + 2 * 128),
    "o_proj": (512, 640),
    "gate_up": (640, 2 * 4096),
    "down_proj": (4096, 640),
    "lm_head": (640, 8192),
}


def quantized(N: int, K: int, group_size: int = 64, seed: int = 0):
    W = mx.random.normal((N, K), key=mx.random.key(seed)) * 0.02
    return mx.quantize(W, group_size=group_size, bits=4)  # w, scales, biases


def inputs(M: int, K: int, seed: int = 1, dtype=mx.float32) -> mx.array:
    return mx.random.normal((M, K), key=mx.random.key(seed)).astype(dtype)


def mlx_qmm(x, w, s, b, group_size=64):
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group_size, bits=4)


def mlx_gate_up(x, w, s, b, group_size=64):
    y = mlx_qmm(x, w, s, b, group_size)
    F = w.shape[0] // 2
    return nn.silu(y[..., :F]) * y[..., F:]


def close(a: mx.array, b: mx.array, tol: float = 2e-5) -> None:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert a.shape == b.shape
    scale = max(float(np.abs(b).max()), 1e-6)
    assert float(np.abs(a - b).max()) <= tol * scale, (float(np.abs(a - b).max()), scale)


# --- the reference algorithm ------------------------------------------------------------------

@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("M", [1, 8])
def test_reference_matches_mlx_at_mistral_shapes(name, M):
    K, N = SHAPES[name]
    w, s, b = quantized(N, K)
    x = inputs(M, K)
    if name == "gate_up":
        close(reference.gate_up_silu(x, w, s, b, group_size=64), mlx_gate_up(x, w, s, b))
    else:
        close(reference.quantized_matmul(x, w, s, b, group_size=64), mlx_qmm(x, w, s, b))


@pytest.mark.parametrize("group_size", reference.GROUP_SIZES)
def test_reference_matches_mlx_at_every_small_m(group_size):
    K, N = 1024 + 128, 72  # a partial last step and a partial last threadgroup of rows
    w, s, b = quantized(N, K, group_size)
    for M in range(1, reference.MAX_M + 1):
        x = inputs(M, K, seed=M)
        close(reference.quantized_matmul(x, w, s, b, group_size=group_size), mlx_qmm(x, w, s, b, group_size))
        w2, s2, b2 = (mx.concatenate([a, a[::-1]]) for a in (w, s, b))
        close(reference.gate_up_silu(x, w2, s2, b2, group_size=group_size), mlx_gate_up(x, w2, s2, b2, group_size))


def test_reference_keeps_leading_dims_and_dtype():
    w, s, b = quantized(64, 512)
    x = inputs(6, 512, dtype=mx.bfloat16).reshape(2, 3, 512)
    y = reference.quantized_matmul(x, w, s, b, group_size=64)
    assert y.shape == (2, 3, 64) and y.dtype == mx.bfloat16
    close(y, mlx_qmm(x.astype(mx.float32), w, s, b), tol=1e-2)


def test_reference_refuses_what_the_kernels_do_not_cover():
    w, s, b = mx.quantize(mx.zeros((8, 512)), group_size=64, bits=8)
    with pytest.raises(ValueError):
        reference.quantized_matmul(inputs(1, 512), w, s, b, group_size=64, bits=8)


# --- the dispatcher ---------------------------------------------------------------------------

@pytest.mark.usefixtures("float_activations")  # float tolerances: int8 activations (the x86 default) are bounded elsewhere
@pytest.mark.parametrize("M", [1, 2, 5, 9, 16, 40])  # 40: the CPU prefill path
def test_dispatched_matmuls_match_mlx(M):
    K, N = SHAPES["qkv"]
    w, s, b = quantized(N, K)
    x = inputs(M, K)
    close(dispatch.quantized_matmul(x, w, s, b, group_size=64, bits=4), mlx_qmm(x, w, s, b))
    close(dispatch.gate_up_silu(x, w, s, b, group_size=64, bits=4), mlx_gate_up(x, w, s, b))


def test_dequantized_matmul_in_blocks_matches_mlx(monkeypatch):
    monkeypatch.setattr(dispatch, "DEQUANT_BLOCK_ROWS", 96)  # 768 rows: 8 blocks
    K, N = SHAPES["qkv"]
    w, s, b = quantized(N, K, group_size=32)
    x = inputs(20, K)
    close(dispatch.dequantized_matmul(x, w, s, b, group_size=32, bits=4), mlx_qmm(x, w, s, b, 32))


def test_gpu_policy_per_shape(monkeypatch):
    monkeypatch.setattr(dispatch, "backend", lambda: "metal")
    monkeypatch.setattr(dispatch, "proven", lambda *key: True)  # the policy alone (probes: test_kernel_probe.py)
    w, s, _ = quantized(64, 512)
    pick = lambda op, M, **kw: dispatch.choose(op, inputs(M, 512), w, s, kw.get("gs", 64), kw.get("bits", 4))  # noqa: E731
    assert pick("qmv", 1) == "mlx"  # MLX's own qmv is the same algorithm for one row
    assert [pick("qmv", M) for M in (2, 8, 9)] == ["metal"] * 3  # one weight pass for all rows
    assert pick("gate_up_silu", 1) == "metal"  # the fused epilogue
    assert pick("qmv", 10) == "mlx" and pick("gate_up_silu", 64) == "mlx"  # prefill
    w8, s8, _ = mx.quantize(mx.zeros((64, 512)), group_size=64, bits=8)
    assert dispatch.choose("qmv", inputs(4, 512), w8, s8, 64, 8) == "mlx"
    monkeypatch.setattr(dispatch, "backend", lambda: "cuda")
    assert pick("qmv", 4) == "cuda" and pick("gate_up_silu", 1) == "cuda"


def test_cpu_kernels_are_used_when_available(monkeypatch):
    calls = []

    def qmm(x, w, scales, biases, *, group_size, bits):
        calls.append(("qmv", x.shape[0]))
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)

    def gate_up(x, w, scales, biases, *, group_size, bits):
        calls.append(("gate_up_silu", x.shape[0]))
        return mlx_gate_up(x, w, scales, biases, group_size)

    fake = SimpleNamespace(available=lambda: True, quantized_matmul=qmm, gate_up_silu=gate_up)
    monkeypatch.setattr(dispatch, "backend", lambda: "cpu")
    monkeypatch.setattr(dispatch, "cpu_kernels", lambda: fake)
    w, s, b = quantized(64, 512)
    x = inputs(3, 512)
    close(dispatch.quantized_matmul(x, w, s, b, group_size=64, bits=4), mlx_qmm(x, w, s, b))
    close(dispatch.gate_up_silu(x, w, s, b, group_size=64, bits=4), mlx_gate_up(x, w, s, b))
    assert calls == [("qmv", 3), ("gate_up_silu", 3)]
    assert "native CPU kernels" in dispatch.describe()
    monkeypatch.setattr(dispatch, "cpu_kernels", lambda: None)
    assert dispatch.choose("qmv", x, w, s, 64, 4) == "mlx"


@pytest.mark.parametrize("openblas", [True, False])
@pytest.mark.parametrize("native", [True, False])
def test_cpu_prefill_goes_to_blas(monkeypatch, openblas, native):
    """Prefill-sized inputs go to BLAS only where OpenBLAS is loaded; otherwise (the README's
    default machine) to the native kernels when built, else MLX."""
    from mlx_mistral import _blas

    monkeypatch.setattr(dispatch, "backend", lambda: "cpu")
    monkeypatch.setattr(_blas, "preload", lambda: "/usr/lib/libblas.so.3" if openblas else None)
    monkeypatch.setattr(dispatch, "cpu_kernels", lambda: SimpleNamespace() if native else None)
    w, s, _ = quantized(64, 512)
    prefill = inputs(dispatch.CPU_DEQUANT_MIN_M, 512)
    below = "cpu" if native else "mlx"
    assert dispatch.choose("qmv", prefill, w, s, 64, 4) == ("dequant" if openblas else below)
    assert dispatch.choose("qmv", prefill[:9], w, s, 64, 4) == below


# --- fused layers -----------------------------------------------------------------------------

def quantized_linear(K: int, N: int, group_size: int = 64, bits: int = 4, seed: int = 0) -> nn.QuantizedLinear:
    layer = nn.Linear(K, N, bias=False)
    layer.weight = mx.random.normal((N, K), key=mx.random.key(seed)) * 0.02
    return nn.QuantizedLinear.from_linear(layer, group_size=group_size, bits=bits)


@pytest.mark.usefixtures("float_activations")  # float tolerances: int8 activations (the x86 default) are bounded elsewhere
@pytest.mark.parametrize("M", [1, 4, 9, 24])
def test_fused_qkv_equals_separate_projections(M):
    parts = [quantized_linear(640, n, seed=i) for i, n in enumerate((512, 128, 128))]
    fused = FusedLinear(concat_linears(parts), (512, 128, 128))
    assert isinstance(fused.linear, DispatchedQuantizedLinear) and fused.linear.weight.shape == (768, 80)
    x = inputs(M, 640).reshape(1, M, 640)
    # the fused call may run the native CPU kernel, the parts MLX's op: fp32 summation orders differ
    for got, part in zip(fused(x), parts):
        close(got, part(x), tol=1e-5)


@pytest.mark.usefixtures("float_activations")  # float tolerances: int8 activations (the x86 default) are bounded elsewhere
@pytest.mark.parametrize("M", [1, 9, 24])
def test_fused_gate_up_equals_swiglu_of_separate_projections(M):
    gate, up = quantized_linear(640, 1024, seed=1), quantized_linear(640, 1024, seed=2)
    fused = FusedGateUp(concat_linears([gate, up]))
    x = inputs(M, 640)
    close(fused(x), nn.silu(gate(x)) * up(x))


def test_unquantized_projections_fuse_too():
    parts = [nn.Linear(64, n, bias=True) for n in (32, 16)]
    fused = FusedLinear(concat_linears(parts), (32, 16))
    x = inputs(3, 64)
    for got, part in zip(fused(x), parts):
        close(got, part(x), tol=1e-6)


def test_mixed_formats_stay_separate():
    assert concat_linears([quantized_linear(256, 64), quantized_linear(256, 64, bits=8)]) is None
    assert concat_linears([quantized_linear(256, 64), quantized_linear(256, 64, group_size=32)]) is None
    assert concat_linears([quantized_linear(256, 64), nn.Linear(256, 64, bias=False)]) is None


# --- the fused model --------------------------------------------------------------------------

def greedy(model, ids: list[int], n: int = 12) -> list[int]:
    from mlx_mistral.generate import generate_step

    return [t for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]


def assert_same_model(fused, unfused, ids: list[int], tol: float, n: int = 12) -> None:
    a, b = fused(mx.array([ids])), unfused(mx.array([ids]))
    close(a, b, tol=tol)
    # decode steps (one row) take the GEMV paths, the prompt (many rows) the matrix ones
    assert greedy(fused, ids, n) == greedy(unfused, ids, n)


@pytest.mark.usefixtures("float_activations")  # float tolerances: int8 activations (the x86 default) are bounded elsewhere
def test_fused_tiny_model_equals_unfused(tiny_dir, tiny_q4_dir):
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 8192, 24)]
    for folder in (tiny_dir, tiny_q4_dir):
        fused, unfused = load_model(folder), load_model(folder, fuse=False)
        attn = fused.layers[0].self_attn
        assert attn.qkv_proj is not None and "q_proj" not in attn and "gate_proj" not in fused.layers[0].mlp
        assert unfused.layers[0].self_attn.qkv_proj is None
        assert_same_model(fused, unfused, ids, tol=1e-5)
        before = np.array(fused(mx.array([ids])))
        fused.fuse()  # a second fuse changes nothing
        np.testing.assert_array_equal(np.array(fused(mx.array([ids]))), before)


@pytest.mark.usefixtures("float_activations")  # float tolerances: int8 activations (the x86 default) are bounded elsewhere
def test_fused_smollm2_4bit_equals_unfused(smollm2_dir):
    unfused = load_model(smollm2_dir, fuse=False)
    nn.quantize(unfused, group_size=64, bits=4)
    fused = load_model(smollm2_dir, fuse=False)
    nn.quantize(fused, group_size=64, bits=4)
    fused.fuse()
    assert isinstance(fused.layers[0].mlp.gate_up_proj.linear, DispatchedQuantizedLinear)
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646]
    assert_same_model(fused, unfused, ids, tol=1e-4, n=6)


@pytest.mark.parametrize("group_size", [32, 64])
def test_kernels_on_smollm2_weights(smollm2_dir, group_size):
    """Real weights have outliers random ones lack; every path against MLX on layer 0."""
    from safetensors.numpy import load_file

    weights = load_file(str(smollm2_dir / "model.safetensors"))
    p = "model.layers.0"
    qkv = np.concatenate([weights[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"])
    gate_up = np.concatenate([weights[f"{p}.mlp.gate_proj.weight"], weights[f"{p}.mlp.up_proj.weight"]])
    x = mx.array(weights["model.embed_tokens.weight"][[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173]])  # (9, 576)
    for M in (1, 3, 9):
        w, s, b = mx.quantize(mx.array(qkv), group_size=group_size, bits=4)
        want = mlx_qmm(x[:M], w, s, b, group_size)
        close(reference.quantized_matmul(x[:M], w, s, b, group_size=group_size), want)
        close(dispatch.quantized_matmul(x[:M], w, s, b, group_size=group_size, bits=4), want)
        w, s, b = mx.quantize(mx.array(gate_up), group_size=group_size, bits=4)
        want = mlx_gate_up(x[:M], w, s, b, group_size)
        close(reference.gate_up_silu(x[:M], w, s, b, group_size=group_size), want)
        close(dispatch.gate_up_silu(x[:M], w, s, b, group_size=group_size, bits=4), want)


# --- the GPU sources --------------------------------------------------------------------------

SOURCES = {"metal": metal, "cuda": cuda}


@pytest.mark.parametrize("backend", SOURCES)
def test_gpu_sources_are_fully_formatted_and_balanced(backend):
    module = SOURCES[backend]
    for text in (module.HEADER, *module.SOURCES.values()):
        assert not re.search(r"\{[A-Z_]+\}", text), "an unformatted tiling constant"
        for a, b in ("{}", "()", "[]"):
            assert text.count(a) == text.count(b)
    for source in module.SOURCES.values():
        # the tiling of reference.py, and the template arguments gpu.launch passes
        assert f"k += {reference.STEP})" in source and f"lane * {reference.VALUES_PER_THREAD}" in source
        assert f"* {reference.SIMDGROUPS}" in source and f"[{reference.ROWS}]" in source
        for name in ("GROUP_SIZE", "IN_DIM", "OUT_DIM", "X_ROWS"):
            assert name in source


def test_metal_and_cuda_kernels_do_the_same_math():
    """The CUDA twin is the Metal body with its dialect swapped; nothing else may differ."""
    dialect = [(r"\*\(\(const device uint2\*\)\((.*?)\)\)", r"*reinterpret_cast<const uint2*>(\1)"),
               (r"float\(((?:scales|biases)\[[^\]]*\])\)", r"static_cast<float>(\1)"),
               (r"metal::exp", "expf"), (r"simd_sum\(", "q4_warp_sum("),
               (r"#pragma unroll\n", ""), (r"int\(thread_index_in_simdgroup\)", "int(threadIdx.x) % 32"),
               (r"int\(threadgroup_position_in_grid.x\)", "int(blockIdx.x)"),
               (r"\s*\+ int\(simdgroup_index_in_threadgroup\)", " + int(threadIdx.x) / 32"),
               (r"simdgroup", "warp"), (r"\s+", " ")]

    def normal(text: str) -> str:
        text = re.sub(r"//[^\n]*", "", text)
        for pattern, repl in dialect:
            text = re.sub(pattern, repl, text)
        return text.strip()

    for name in metal.SOURCES:
        assert normal(metal.SOURCES[name]) == normal(cuda.SOURCES[name])


def test_metal_kernels_build_here_and_refuse_to_run_without_metal():
    for name in metal.SOURCES:
        assert metal.kernel(name) is metal.kernel(name)  # built once
    if mx.metal.is_available():
        pytest.skip("this machine has Metal; the gated parity tests run the kernels")
    w, s, b = quantized(8, 512)
    with pytest.raises(RuntimeError, match="Metal"):
        mx.eval(gpu.launch(metal, "qmv", inputs(1, 512), w, s, b, 64, 8))


def gpu_parity(module) -> None:
    for group_size in reference.GROUP_SIZES:
        for dtype in (mx.float16, mx.bfloat16, mx.float32):
            tol = 2e-5 if dtype == mx.float32 else 2e-2
            for name, (K, N) in SHAPES.items():
                w, s, b = quantized(N, K, group_size)
                s, b = s.astype(dtype), b.astype(dtype)
                for M in range(1, reference.MAX_M + 1):
                    x = inputs(M, K, seed=M, dtype=dtype)
                    x32, s32, b32 = (a.astype(mx.float32) for a in (x, s, b))
                    got = gpu.launch(module, "qmv", x, w, s, b, group_size, N)
                    assert got.dtype == dtype
                    close(got, mlx_qmm(x32, w, s32, b32, group_size), tol)
                    close(got, reference.quantized_matmul(x32, w, s32, b32, group_size=group_size), tol)
                    got = gpu.launch(module, "gate_up_silu", x, w, s, b, group_size, N // 2)
                    close(got, mlx_gate_up(x32, w, s32, b32, group_size), tol)


@pytest.mark.metal
@pytest.mark.skipif(not mx.metal.is_available(), reason="needs MLX's Metal backend (Apple Silicon)")
def test_metal_kernels_match_mlx_and_reference():
    gpu_parity(metal)


@pytest.mark.cuda
@pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")
def test_cuda_kernels_match_mlx_and_reference():
    gpu_parity(cuda)


CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float"}


def cuda_translation_unit() -> str:
    """Both CUDA kernels, every activation dtype, wrapped as mx.fast.cuda_kernel wraps a body
    (MLX's own device header swapped for the CUDA headers it brings in)."""
    unit = ["#include <cuda_bf16.h>", "#include <cuda_fp16.h>", "#include <cooperative_groups.h>",
            "#include <cstdint>", cuda.HEADER, "namespace mlx::core::cu {", "namespace cg = cooperative_groups;"]
    for name, source in cuda.SOURCES.items():
        for dtype, ctype in CUDA_TYPES.items():
            unit += [f"__global__ void {name}_{ctype.strip('_')}(const {ctype}* x, const uint32_t* w,",
                     f"    const {ctype}* scales, const {ctype}* biases, {ctype}* y) {{",
                     f"  using T = {ctype};", "  constexpr int GROUP_SIZE = 64;", "  constexpr int IN_DIM = 5120;",
                     "  constexpr int OUT_DIM = 6144;", "  constexpr int X_ROWS = 8;", source, "}"]
    return "\n".join(unit + ["}  // namespace mlx::core::cu"])


@pytest.mark.slow  # a 20 s nvcc subprocess
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA compiler (nvcc)")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """No GPU needed to compile to PTX: catches any syntax or type error in the CUDA twin."""
    unit = tmp_path / "kernels.cu"
    unit.write_text(cuda_translation_unit())
    done = subprocess.run(["nvcc", "-arch=sm_80", "-std=c++17", "--ptx", "-o", str(tmp_path / "kernels.ptx"), str(unit)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = (tmp_path / "kernels.ptx").read_text()
    assert ptx.count(".entry") == len(cuda.SOURCES) * len(CUDA_TYPES)
    assert "shfl.sync.bfly" in ptx  # the warp butterfly sum
