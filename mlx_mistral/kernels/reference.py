"""The decode GEMV algorithm of our Metal and CUDA kernels, written with MLX ops.

It follows the kernels step for step (same tiling, same fp32 accumulation order up to the
order of additions inside one vector sum), so the algorithm is proven on any machine against
`mx.quantized_matmul`, and the GPU kernels are then checked against this.

Tiling, shared by every backend (the Metal and CUDA sources are formatted from these numbers):
- a threadgroup (CUDA block) holds SIMDGROUPS simdgroups (warps) of SIMD_WIDTH lanes;
- each simdgroup owns ROWS consecutive output rows and walks the whole input dimension K;
- per step a lane takes VALUES_PER_THREAD consecutive inputs (two uint32 words of eight 4-bit
  weights per row), so a simdgroup covers STEP = SIMD_WIDTH * VALUES_PER_THREAD inputs a step;
- a lane keeps one fp32 partial per (input row, output row) across all steps; a simdgroup sum
  (simd_sum / warp shuffles) combines the lanes at the end.
Per step and row a lane computes `scale * sum(x_i * q_i) + bias * sum(x_i)` for its 16 inputs
(they always sit in one quantization group: group sizes are multiples of 16), with the 4-bit
values unpacked by masking only: `q * 16**j` is read straight out of a uint16 and the input is
pre-divided by `16**j`, which in binary floating point is exact.
"""

from __future__ import annotations

import mlx.core as mx

SIMD_WIDTH = 32
SIMDGROUPS = 2  # per threadgroup: 64 threads, the occupancy MLX's qmv_fast also uses
ROWS = 4  # output rows per simdgroup; each lane reuses its inputs across them
VALUES_PER_THREAD = 16  # two uint32 words of 4-bit weights per row per step
STEP = SIMD_WIDTH * VALUES_PER_THREAD  # 512 inputs per simdgroup step
ROWS_PER_THREADGROUP = SIMDGROUPS * ROWS  # 8
BITS = 4
GROUP_SIZES = (32, 64, 128)
MAX_M = 9  # input rows one launch carries (decode, or a draft of up to 8 tokens plus one)

# the nibble in position j of a uint16 (mask 0xF << 4j) holds q * 16**j
_NIBBLE_SCALE = (1.0, 1 / 16, 1 / 256, 1 / 4096)


def _masked_nibbles(w: mx.array) -> mx.array:
    """(N, K/8) uint32 -> (N, K) float32 holding q * 16**(i % 4), as the kernels read them."""
    parts = []
    for e in range(8):
        shift, mask = 16 * (e // 4), 0xF << (4 * (e % 4))
        parts.append((mx.right_shift(w, shift) & mask).astype(mx.float32))
    return mx.stack(parts, axis=-1).reshape(w.shape[0], -1)  # (N, K)


def _lane_partials(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """fp32 partials per lane: (M, N, SIMD_WIDTH), before the simdgroup sum."""
    M, K = x.shape
    N = w.shape[0]
    steps = -(-K // STEP)
    pad = steps * STEP - K  # lanes past K contribute nothing: zero inputs, zero weights
    x = mx.pad(x.astype(mx.float32), [(0, 0), (0, pad)])  # (M, K')
    wv = mx.pad(_masked_nibbles(w), [(0, 0), (0, pad)])  # (N, K')
    pre = mx.array(_NIBBLE_SCALE * (steps * STEP // 4))  # (K',) the input pre-division
    x_thread = (x * pre).reshape(M, steps * SIMD_WIDTH, VALUES_PER_THREAD).transpose(1, 0, 2)  # (S*32, M, 16)
    w_thread = wv.reshape(N, steps * SIMD_WIDTH, VALUES_PER_THREAD).transpose(1, 2, 0)  # (S*32, 16, N)
    dot = (x_thread @ w_thread).reshape(steps, SIMD_WIDTH, M, N)  # sum(x_i * q_i) per lane and step
    x_sum = x.reshape(M, steps, SIMD_WIDTH, VALUES_PER_THREAD).sum(-1)  # (M, S, 32) plain inputs
    # the group of the first input a lane holds in each step
    first = mx.arange(steps * SIMD_WIDTH) * VALUES_PER_THREAD
    group = mx.minimum(first // group_size, scales.shape[1] - 1)
    live = (first < K).astype(mx.float32)  # padded lanes: their clamped group must not count
    s = (scales.astype(mx.float32)[:, group] * live).reshape(N, steps, SIMD_WIDTH)  # (N, S, 32)
    b = (biases.astype(mx.float32)[:, group] * live).reshape(N, steps, SIMD_WIDTH)
    contrib = (s.transpose(1, 2, 0)[:, :, None, :] * dot
               + x_sum.transpose(1, 2, 0)[..., None] * b.transpose(1, 2, 0)[:, :, None, :])  # (S, 32, M, N)
    acc = contrib[0]
    for step in range(1, steps):  # a lane's register accumulates the steps in order
        acc = acc + contrib[step]
    return acc.transpose(1, 2, 0)  # (M, N, 32)


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                     group_size: int = 64, bits: int = BITS) -> mx.array:
    """x (..., K) times the 4-bit affine (N, K) matrix, transposed: (..., N), like
    `mx.quantized_matmul(..., transpose=True)`."""
    _check(bits, group_size)
    lead, K = x.shape[:-1], x.shape[-1]
    y = _lane_partials(x.reshape(-1, K), w, scales, biases, group_size).sum(-1)  # simd_sum
    return y.astype(x.dtype).reshape(*lead, w.shape[0])


def gate_up_silu(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                 group_size: int = 64, bits: int = BITS) -> mx.array:
    """silu(x·Wg) * (x·Wu) for the fused (2F, K) [gate rows; up rows] matrix: (..., F).
    The epilogue runs in fp32 on the simdgroup sums; only the product is written."""
    _check(bits, group_size)
    lead, K = x.shape[:-1], x.shape[-1]
    F = w.shape[0] // 2
    y = _lane_partials(x.reshape(-1, K), w, scales, biases, group_size).sum(-1)  # (M, 2F)
    g, u = y[:, :F], y[:, F:]
    out = g * mx.sigmoid(g) * u
    return out.astype(x.dtype).reshape(*lead, F)


def _check(bits: int, group_size: int) -> None:
    if bits != BITS or group_size not in GROUP_SIZES:
        raise ValueError(f"the reference kernel covers 4-bit groups of {GROUP_SIZES}, not {bits}-bit g{group_size}")
