"""Which implementation runs each quantized matmul: decided once per backend, then per shape.

Backends: Metal GPU, CUDA GPU, else MLX's CPU backend. Implementations:
- "metal" / "cuda": our GEMV kernels (`metal.py`, `cuda.py`) for 4-bit affine weights, group
  32/64/128, 1 to 9 input rows. On a GPU the plain one-row GEMV stays with MLX's own qmv (the
  same algorithm, tuned for years); ours take what MLX lacks: several input rows per weight pass
  (draft verification) and the gate/up projection with its SiLU-multiply epilogue.
- "cpu": native CPU kernels from `kernels/cpu.py` when that module is present and available.
- "dequant": on the CPU with OpenBLAS, prefill-sized inputs dequantize the weights in row blocks
  and multiply with BLAS: MLX's CPU quantized matmul costs the same per input row as a whole
  GEMV (no reuse across rows), so from a few dozen rows on BLAS wins, by ~10x at 256 rows.
- "mlx": `mx.quantized_matmul`, the fallback for everything else.

A GPU kernel is used only once proven in this process: at its first use for a (backend, kernel,
dtype, bits, group size), it runs on a small shape against `mx.quantized_matmul`; a build error
or a mismatch is one warning and MLX's own op for the rest of the process, so no machine gets a
crash or wrong logits from a kernel that was never run there.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .. import _blas
from . import cuda, gpu, metal

CPU_DEQUANT_MIN_M = 32  # input rows from which dequantize + BLAS clearly beats MLX's CPU qmm
DEQUANT_BLOCK_ROWS = 4096  # bounds the fp32 dequantized block: 4096 x 5120 x 4 B = 84 MB
_GPU_SOURCES = {"metal": metal, "cuda": cuda}
# (backend, op, dtype, bits, group size) -> whether that kernel matched MLX here: filled at first
# use, never cleared (a kernel that failed once is not retried in the same process)
PROVEN: dict[tuple, bool] = {}
PROBE_ROWS, PROBE_OUT, PROBE_IN = 3, 64, 1024  # several input rows, 8 threadgroups, 2 simdgroup steps
PROBE_TOLERANCE = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 3e-2}  # of the largest |output|


def backend() -> str:
    """"metal", "cuda" or "cpu": where MLX computes by default in this process. The one answer
    to "which backend" for the whole package (kernels, compute dtype, the engine's backends,
    benchmarks)."""
    if mx.default_device() == mx.gpu:
        return "metal" if mx.metal.is_available() else "cuda"
    return "cpu"


def compute_dtype(model=None) -> Optional[mx.Dtype]:
    """The dtype activations are computed in; the one answer for the whole package.

    Without a model, the loading policy: float32 on MLX's CPU backend (its quantized matmul is
    ~10x faster in float32 than in bfloat16), None on GPUs (keep the checkpoint's
    float16/bfloat16). With a model: the dtype of its floating parameters, which its forward
    computes in."""
    if model is None:
        return mx.float32 if backend() == "cpu" else None
    from mlx.utils import tree_flatten

    return next((v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)), None)


@functools.cache
def cpu_kernels() -> Optional[ModuleType]:
    """The native CPU kernel module when it is installed and usable here, else None."""
    try:
        from . import cpu
    except ImportError:
        cpu = None
    return cpu if cpu is not None and cpu.available() else None


def describe() -> str:
    """One phrase for --verbose: which kernels this process runs."""
    where = backend()
    if where != "cpu":
        return f"{where}: our GEMV kernels for gate/up and 2-9 rows, MLX's elsewhere"
    parts = ["native CPU kernels" if cpu_kernels() is not None else "MLX's quantized matmul"]
    if _blas.preload():
        parts.append(f"dequantize + BLAS from {CPU_DEQUANT_MIN_M} rows")
    return "cpu: " + ", ".join(parts)


def choose(op: str, x: mx.array, w: mx.array, scales: mx.array, group_size: int, bits: int,
           mode: str = "affine") -> str:
    """The implementation for `op` ("qmv" or "gate_up_silu") at these shapes."""
    rows = x.size // x.shape[-1]
    where = backend()
    if where in _GPU_SOURCES:
        if (gpu.covers(x, w, scales, group_size, bits, mode) and (op == "gate_up_silu" or rows > 1)
                and proven(where, op, x.dtype, bits, group_size)):
            return where
        return "mlx"
    if mode != "affine":
        return "mlx"
    if rows >= CPU_DEQUANT_MIN_M and _blas.preload():
        return "dequant"
    if cpu_kernels() is not None:
        return "cpu"
    return "mlx"


def proven(where: str, op: str, dtype: mx.Dtype, bits: int, group_size: int) -> bool:
    """Whether our `op` kernel on `where` matches `mx.quantized_matmul` for this dtype, bits and
    group size; checked once per process, on a small shape, the first time it is asked."""
    key = (where, op, dtype, bits, group_size)
    if key not in PROVEN:
        problem = _probe(_GPU_SOURCES[where], op, dtype, bits, group_size)
        PROVEN[key] = problem is None
        if problem:
            warnings.warn(f"mlx-mistral: our {where} {op} kernel ({dtype}, {bits}-bit, group {group_size}) {problem}; "
                          "using MLX's quantized matmul instead", RuntimeWarning, stacklevel=2)
    return PROVEN[key]


def _probe(source: ModuleType, op: str, dtype: mx.Dtype, bits: int, group_size: int) -> Optional[str]:
    """None if kernel `op` of `source` matches MLX on a small random problem, else what went wrong."""
    kw, kx = mx.random.split(mx.random.key(0))
    w = mx.random.normal((PROBE_OUT, PROBE_IN), key=kw) * 0.02
    wq, scales, biases = mx.quantize(w.astype(dtype), group_size=group_size, bits=bits)
    x = mx.random.normal((PROBE_ROWS, PROBE_IN), key=kx).astype(dtype)
    want = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=bits)
    if op == "gate_up_silu":
        want = silu_mul(want)
    try:
        got = gpu.launch(source, op, x, wq, scales, biases, group_size, want.shape[-1])
        mx.eval(got, want)
    except Exception as e:  # noqa: BLE001  (whatever an unproven kernel raises, MLX's op takes over)
        return f"failed to run ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
    if got.shape != want.shape:
        return f"returned shape {tuple(got.shape)} instead of {tuple(want.shape)}"
    scale = mx.abs(want.astype(mx.float32)).max().item() or 1.0
    err = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()
    if not err <= PROBE_TOLERANCE.get(dtype, 1e-2) * scale:  # also catches NaN
        return f"disagrees with mx.quantized_matmul (max error {err:.3g} of {scale:.3g})"
    return None


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: Optional[mx.array], *,
                     group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """`mx.quantized_matmul(x, w, scales, biases, transpose=True, ...)`: (..., K) -> (..., N)."""
    impl = choose("qmv", x, w, scales, group_size, bits, mode)
    if impl in _GPU_SOURCES:
        return gpu.launch(_GPU_SOURCES[impl], "qmv", x, w, scales, biases, group_size, w.shape[0])
    if impl == "cpu":
        return cpu_kernels().quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    if impl == "dequant":
        return dequantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)


def gate_up_silu(x: mx.array, w: mx.array, scales: mx.array, biases: Optional[mx.array], *,
                 group_size: int, bits: int, mode: str = "affine") -> mx.array:
    """silu(x·Wg) * (x·Wu) for the fused (2F, K) matrix [gate rows; up rows]: (..., K) -> (..., F)."""
    impl = choose("gate_up_silu", x, w, scales, group_size, bits, mode)
    F = w.shape[0] // 2
    if impl in _GPU_SOURCES:
        return gpu.launch(_GPU_SOURCES[impl], "gate_up_silu", x, w, scales, biases, group_size, F)
    if impl == "cpu":
        return cpu_kernels().gate_up_silu(x, w, scales, biases, group_size=group_size, bits=bits)
    if impl == "dequant":
        y = dequantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    else:
        y = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)
    return silu_mul(y)


def silu_mul(y: mx.array) -> mx.array:
    """(..., 2F) [gate; up] -> (..., F): the SwiGLU product."""
    F = y.shape[-1] // 2
    return nn.silu(y[..., :F]) * y[..., F:]


def dequantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                       group_size: int, bits: int) -> mx.array:
    """x @ dequantize(w).T in blocks of output rows, each a dense BLAS matmul."""
    N = w.shape[0]
    outs = []
    for start in range(0, N, DEQUANT_BLOCK_ROWS):
        end = min(start + DEQUANT_BLOCK_ROWS, N)
        block = w[start:end]
        if outs:  # one dense block alive at a time: dequantize after the previous matmul
            block = mx.depends(block, outs[-1])
        dense = mx.dequantize(block, scales[start:end], biases[start:end], group_size=group_size, bits=bits)
        outs.append(x @ dense.astype(x.dtype).T)  # (..., end - start)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """`layer(x)` for an nn.Linear or nn.QuantizedLinear, quantized ones through the dispatcher."""
    if not isinstance(layer, nn.QuantizedLinear):
        return layer(x)
    y = quantized_matmul(x, layer["weight"], layer["scales"], layer.get("biases"),
                         group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return y + layer["bias"] if "bias" in layer else y


def gate_up_linear(layer: nn.Module, x: mx.array) -> mx.array:
    """silu(gate) * up for a fused [gate; up] nn.Linear or nn.QuantizedLinear."""
    if isinstance(layer, nn.QuantizedLinear) and "bias" not in layer:
        return gate_up_silu(x, layer["weight"], layer["scales"], layer.get("biases"),
                            group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return silu_mul(linear(layer, x))
