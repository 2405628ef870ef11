"""Native CPU kernels for MLX's affine quantized matmul (4/8-bit, groups 32/64/128).

MLX's CPU backend runs quantized matmul as scalar loops (~40x slower than llama.cpp here). These
kernels (cpu_qmm.c: AVX2/FMA GEMV for decode, dequantized tiles + the process's optimized BLAS for
prefill, rows over all cores) read the packed weights in place through zero-copy numpy views.

The price of calling C without an MLX primitive: every call is an eval boundary. The pending
graph producing `x` is evaluated, the C kernel runs at once, and its result comes back as a new
(small) MLX array: ~15 us of Python and two thread hand-offs per call. That is why a quantized
model on the CPU runs its whole forward pass in one native call instead (`cpu_model.py`); the
functions here serve the dispatcher when that decoder does not run (quantized or rotating KV
caches, models it does not cover, `backend_for(model, native=False)`).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import platform
import warnings
import weakref
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import _build

GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)
DTYPE_CODES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}  # as cpu_qmm.c numbers them

_QMM_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("MLX_MISTRAL_KERNEL_CACHE", Path(root) / "mlx-mistral" / "kernels"))


def _open(path: Path) -> Optional[ctypes.CDLL]:
    """The library at `path` if it loads and was built from this exact source."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    lib.mm_source_hash.restype = ctypes.c_char_p
    return lib if lib.mm_source_hash().decode() == _build.source_hash() else None


def _sgemm_address() -> Optional[int]:
    """cblas_sgemm of an optimized BLAS already in the process (OpenBLAS, Accelerate), if any."""
    from .. import _blas

    candidates = [_blas.preload()]
    if platform.system() == "Darwin":
        candidates.append("/System/Library/Frameworks/Accelerate.framework/Accelerate")
    for path in filter(None, candidates):
        try:
            return ctypes.cast(ctypes.CDLL(path).cblas_sgemm, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


@functools.cache
def _library() -> tuple[Optional[ctypes.CDLL], str]:
    """(library, how it was found) or (None, why not). Built here on first use if need be."""
    if os.environ.get("MLX_MISTRAL_CPU_KERNELS") == "0":
        return None, "disabled by MLX_MISTRAL_CPU_KERNELS=0"
    spec = importlib.util.find_spec("mlx_mistral.kernels._cpu_qmm")  # built by `pip install`
    lib = _open(Path(spec.origin)) if spec and spec.origin else None
    where = "built at install"
    if lib is None:
        cached = _cache_dir() / f"cpu_qmm-{_build.source_hash()}-{platform.machine()}.so"
        if not cached.exists():
            failure = _build.compile_library(cached)
            if failure:
                return None, failure
        lib = _open(cached)
        where = f"built into {cached.parent}"
        if lib is None:
            return None, f"{cached} does not load"
    lib.mm_qmm.argtypes = _QMM_ARGS
    lib.mm_gate_up_silu.argtypes = _QMM_ARGS
    lib.mm_qmm_multi.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_void_p]
    lib.mm_set_sgemm.argtypes = [ctypes.c_void_p]
    lib.mm_set_sgemm(_sgemm_address())
    return lib, where


def available() -> bool:
    """True when the native library is built and loads on this machine."""
    return _library()[0] is not None


def describe() -> str:
    """One phrase for --verbose output and benchmarks."""
    lib, how = _library()
    if lib is None:
        return f"MLX's own quantized matmul (native CPU kernels unavailable: {how})"
    simd = {2: "AVX2/FMA", 3: "AVX-512/AVX2/FMA"}.get(lib.mm_simd(), "portable C")
    if lib.mm_int8():
        rows = "" if lib.mm_int8() == 1 else " from 2 rows"
        simd += f", 4-bit GEMV on int8 activations{rows}" + (" (512-bit)" if lib.mm_int8_wide() else "")
        simd += ", VNNI" if lib.mm_vnni() else ""
    return f"native CPU kernels ({simd}, {lib.mm_threads()} threads, {how})"


def set_threads(n: int) -> None:
    """Threads the native kernels use (default: all cores)."""
    lib = _library()[0]
    if lib is not None:
        lib.mm_set_threads(int(n))


@functools.cache
def _warn_slow_path(why: str) -> None:
    # cached: the warning is given once per reason, not once per matmul
    warnings.warn(f"mlx-mistral runs quantized matmuls on MLX's slow CPU path: {why}", RuntimeWarning, stacklevel=3)


def supports(group_size: int, bits: int) -> bool:
    return available() and group_size in GROUP_SIZES and bits in BITS


class Packed:
    """Raw pointers to one quantized matrix (N, K). With `hold`, numpy views keep the MLX buffers
    alive for as long as this object; without, whoever made it must keep the arrays alive."""

    def __init__(self, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
                 hold: bool = True):
        if scales.dtype not in DTYPE_CODES or biases.dtype != scales.dtype or w.dtype != mx.uint32:
            raise ValueError(f"unsupported quantized matrix: w {w.dtype}, scales {scales.dtype}, biases {biases.dtype}")
        mx.eval(w, scales, biases)
        as_bits = (lambda a: a) if scales.dtype == mx.float32 else (lambda a: a.view(mx.uint16))  # zero-copy
        views = [np.ascontiguousarray(np.asarray(w)), np.ascontiguousarray(np.asarray(as_bits(scales))),
                 np.ascontiguousarray(np.asarray(as_bits(biases)))]
        if not hold and any(v.base is None for v in views):
            raise ValueError("quantized matrix is not contiguous")  # the copy would not outlive this call
        self.views = views if hold else None
        self.w, self.scales, self.biases = (v.ctypes.data for v in views)
        self.dtype = DTYPE_CODES[scales.dtype]
        self.N = w.shape[0]
        self.K = w.shape[1] * 32 // bits
        self.group_size, self.bits = group_size, bits

    def __call__(self, x: mx.array, *, gate_up_silu: bool = False) -> mx.array:
        """x (..., K) -> (..., N), or (..., N/2) with the SwiGLU of [gate; up] applied."""
        xn = self.host_input(x)  # (M, K)
        n_out = self.N // 2 if gate_up_silu else self.N
        y = np.empty((*x.shape[:-1], n_out), np.float32)  # (..., n_out): no reshape in MLX afterwards
        fn = _library()[0].mm_gate_up_silu if gate_up_silu else _library()[0].mm_qmm
        rc = fn(xn.ctypes.data, xn.shape[0], self.K, self.w, self.scales, self.biases, self.dtype, n_out,
                self.group_size, self.bits, y.ctypes.data)
        if rc != 0:
            raise ValueError(f"cpu_qmm does not support group_size={self.group_size}, bits={self.bits}")
        return to_mlx(y, x)

    def host_input(self, x: mx.array) -> np.ndarray:
        """x evaluated (the eval boundary) as a contiguous fp32 (M, K) host array, no copy if it can."""
        if x.shape[-1] != self.K:
            raise ValueError(f"x has {x.shape[-1]} features, the matrix {self.K}")
        xf = x if x.dtype == mx.float32 else x.astype(mx.float32)
        mx.eval(xf)
        return np.ascontiguousarray(np.asarray(xf)).reshape(-1, self.K)


def to_mlx(y: np.ndarray, like: mx.array) -> mx.array:
    """(..., N) host result -> MLX array typed like the input."""
    out = mx.array(y)
    return out if like.dtype == mx.float32 else out.astype(like.dtype)


class _PackedCache:
    """Pointers of matrices the functional API has seen, dropped when their arrays are freed
    (weak references: the cache never keeps a model's weights alive)."""

    def __init__(self):
        self.entries: dict[tuple[int, int, int], tuple[list, Packed]] = {}

    def get(self, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> Packed:
        key = (id(w), id(scales), id(biases))
        entry = self.entries.get(key)
        if entry and all(r() is a for r, a in zip(entry[0], (w, scales, biases))) and \
                (entry[1].group_size, entry[1].bits) == (group_size, bits):
            return entry[1]
        packed = Packed(w, scales, biases, group_size, bits, hold=False)
        drop = lambda _ref, key=key: self.entries.pop(key, None)  # noqa: E731
        self.entries[key] = ([weakref.ref(a, drop) for a in (w, scales, biases)], packed)
        return packed


_PACKED = _PackedCache()


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int,
                     bits: int) -> mx.array:
    """`mx.quantized_matmul(x, w, scales, biases, transpose=True, ...)` on the native kernels
    (MLX's op where they are missing or the format is not covered)."""
    if not supports(group_size, bits) or scales.dtype not in DTYPE_CODES:
        if not available():
            _warn_slow_path(_library()[1])
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
    return _PACKED.get(w, scales, biases, group_size, bits)(x)


def gate_up_silu(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int,
                 bits: int) -> mx.array:
    """silu(x . Wg^T) * (x . Wu^T) where w/scales/biases hold [gate rows; up rows] (2F, K)."""
    if not supports(group_size, bits) or scales.dtype not in DTYPE_CODES:
        if not available():
            _warn_slow_path(_library()[1])
        gu = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
        g, u = mx.split(gu, 2, axis=-1)  # (..., F) each
        return nn.silu(g) * u
    return _PACKED.get(w, scales, biases, group_size, bits)(x, gate_up_silu=True)
