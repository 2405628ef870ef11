"""Launching the GEMV kernels of `metal.py` / `cuda.py`: grid, template arguments, shapes.

Both backends take the same call (mx.fast.metal_kernel and mx.fast.cuda_kernel objects share
one calling convention, grid counted in threads), so one launcher serves both.
"""

from __future__ import annotations

from types import ModuleType

import mlx.core as mx

from .reference import BITS, GROUP_SIZES, MAX_M, ROWS_PER_THREADGROUP, SIMD_WIDTH, SIMDGROUPS

FLOAT_TYPES = (mx.float16, mx.bfloat16, mx.float32)


def covers(x: mx.array, w: mx.array, scales: mx.array, group_size: int, bits: int, mode: str = "affine") -> bool:
    """Whether the GEMV kernels handle this call: 4-bit affine, group 32/64/128, at most MAX_M
    input rows, float activations, K a whole number of groups."""
    K = x.shape[-1]
    rows = x.size // K if K else 0
    return (mode == "affine" and bits == BITS and group_size in GROUP_SIZES and 1 <= rows <= MAX_M
            and x.dtype in FLOAT_TYPES and K % group_size == 0 and w.shape[-1] * 8 == K
            and scales.shape[-1] * group_size == K)


def launch(backend: ModuleType, name: str, x: mx.array, w: mx.array, scales: mx.array, biases: mx.array,
           group_size: int, out_rows: int) -> mx.array:
    """Run kernel `name` of `backend` (metal or cuda module): x (..., K) -> (..., out_rows)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    threads = SIMD_WIDTH * SIMDGROUPS
    blocks = -(-out_rows // ROWS_PER_THREADGROUP)
    (y,) = backend.kernel(name)(
        inputs=[x2, w, scales, biases],
        template=[("T", x.dtype), ("GROUP_SIZE", group_size), ("IN_DIM", K), ("OUT_DIM", out_rows), ("X_ROWS", M)],
        grid=(blocks * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(M, out_rows)],
        output_dtypes=[x.dtype],
    )
    return y.reshape(*x.shape[:-1], out_rows)
