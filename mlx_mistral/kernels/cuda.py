"""CUDA twins of the Metal kernels in `metal.py`: the same tiling and math, line for line.

A threadgroup is a block of SIMDGROUPS warps; `simd_sum` becomes a butterfly of warp shuffles.
Template arguments are the same names (T, GROUP_SIZE, IN_DIM, OUT_DIM, X_ROWS); MLX defines
them as constexpr values at the top of the generated kernel.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from .reference import ROWS, SIMD_WIDTH, SIMDGROUPS, STEP, VALUES_PER_THREAD

_CONSTANTS = dict(ROWS=ROWS, SIMDGROUPS=SIMDGROUPS, STEP=STEP, VPT=VALUES_PER_THREAD, SIMD=SIMD_WIDTH)

HEADER = """
// 16 consecutive inputs into fp32 registers, the j-th of every four pre-divided by 16**j so a
// nibble masked in place (q * 16**j) needs no shift; returns the plain sum for the bias term.
template <typename T>
__device__ __forceinline__ float q4_load_x16(const T* x, float* xt) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; i += 4) {
    const float a = static_cast<float>(x[i]), b = static_cast<float>(x[i + 1]);
    const float c = static_cast<float>(x[i + 2]), d = static_cast<float>(x[i + 3]);
    sum += a + b + c + d;
    xt[i] = a;
    xt[i + 1] = b / 16.0f;
    xt[i + 2] = c / 256.0f;
    xt[i + 3] = d / 4096.0f;
  }
  return sum;
}

__device__ __forceinline__ float q4_dot_word(uint32_t word, const float* xt) {
  const uint32_t lo = word & 0xffffu, hi = word >> 16;
  return xt[0] * float(lo & 0x000fu) + xt[1] * float(lo & 0x00f0u) + xt[2] * float(lo & 0x0f00u)
       + xt[3] * float(lo & 0xf000u) + xt[4] * float(hi & 0x000fu) + xt[5] * float(hi & 0x00f0u)
       + xt[6] * float(hi & 0x0f00u) + xt[7] * float(hi & 0xf000u);
}

// scale * sum(x * q) + bias * sum(x) over one lane's 16 inputs of one row
__device__ __forceinline__ float q4_qdot16(uint2 wq, const float* xt, float scale, float bias, float xsum) {
  return scale * (q4_dot_word(wq.x, xt) + q4_dot_word(wq.y, xt + 8)) + xsum * bias;
}

__device__ __forceinline__ float q4_warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}
"""

_PROLOGUE = """
  constexpr int KW = IN_DIM / 8;           // uint32 words per weight row
  constexpr int KG = IN_DIM / GROUP_SIZE;  // quantization groups per weight row
  const int lane = int(threadIdx.x) % {SIMD};
  const int row0 = (int(blockIdx.x) * {SIMDGROUPS} + int(threadIdx.x) / {SIMD}) * {ROWS};
  if (row0 >= OUT_DIM) {{
    return;  // the whole warp leaves together: no shuffle waits on it
  }}
"""

QMV_SOURCE = (_PROLOGUE + """
  float acc[X_ROWS][{ROWS}];
#pragma unroll
  for (int m = 0; m < X_ROWS; m++) {{
#pragma unroll
    for (int r = 0; r < {ROWS}; r++) {{
      acc[m][r] = 0.0f;
    }}
  }}
  for (int k = lane * {VPT}; k < IN_DIM; k += {STEP}) {{
    uint2 wq[{ROWS}];
    float sc[{ROWS}], bi[{ROWS}];
#pragma unroll
    for (int r = 0; r < {ROWS}; r++) {{
      const int row = min(row0 + r, OUT_DIM - 1);  // rows past the end are read, never stored
      wq[r] = *reinterpret_cast<const uint2*>(w + row * KW + k / 8);
      sc[r] = static_cast<float>(scales[row * KG + k / GROUP_SIZE]);
      bi[r] = static_cast<float>(biases[row * KG + k / GROUP_SIZE]);
    }}
#pragma unroll
    for (int m = 0; m < X_ROWS; m++) {{  // every input row reuses the weights in registers
      float xt[{VPT}];
      const float xsum = q4_load_x16(x + m * IN_DIM + k, xt);
#pragma unroll
      for (int r = 0; r < {ROWS}; r++) {{
        acc[m][r] += q4_qdot16(wq[r], xt, sc[r], bi[r], xsum);
      }}
    }}
  }}
#pragma unroll
  for (int m = 0; m < X_ROWS; m++) {{
#pragma unroll
    for (int r = 0; r < {ROWS}; r++) {{
      const float v = q4_warp_sum(acc[m][r]);
      if (lane == 0 && row0 + r < OUT_DIM) {{
        y[m * OUT_DIM + row0 + r] = static_cast<T>(v);
      }}
    }}
  }}
""").format(**_CONSTANTS)

# w holds 2 * OUT_DIM rows: gate rows first, then up rows (the fused layout of the model).
GATE_UP_SOURCE = (_PROLOGUE + """
  float acc_g[X_ROWS][{ROWS}], acc_u[X_ROWS][{ROWS}];
#pragma unroll
  for (int m = 0; m < X_ROWS; m++) {{
#pragma unroll
    for (int r = 0; r < {ROWS}; r++) {{
      acc_g[m][r] = 0.0f;
      acc_u[m][r] = 0.0f;
    }}
  }}
  for (int k = lane * {VPT}; k < IN_DIM; k += {STEP}) {{
    uint2 wg[{ROWS}], wu[{ROWS}];
    float sg[{ROWS}], bg[{ROWS}], su[{ROWS}], bu[{ROWS}];
#pragma unroll
    for (int r = 0; r < {ROWS}; r++) {{
      const int g = min(row0 + r, OUT_DIM - 1);  // rows past the end are read, never stored
      const int u = g + OUT_DIM;
      wg[r] = *reinterpret_cast<const uint2*>(w + g * KW + k / 8);
      wu[r] = *reinterpret_cast<const uint2*>(w + u * KW + k / 8);
      sg[r] = static_cast<float>(scales[g * KG + k / GROUP_SIZE]);
      bg[r] = static_cast<float>(biases[g * KG + k / GROUP_SIZE]);
      su[r] = static_cast<float>(scales[u * KG + k / GROUP_SIZE]);
      bu[r] = static_cast<float>(biases[u * KG + k / GROUP_SIZE]);
    }}
#pragma unroll
    for (int m = 0; m < X_ROWS; m++) {{
      float xt[{VPT}];
      const float xsum = q4_load_x16(x + m * IN_DIM + k, xt);
#pragma unroll
      for (int r = 0; r < {ROWS}; r++) {{
        acc_g[m][r] += q4_qdot16(wg[r], xt, sg[r], bg[r], xsum);
        acc_u[m][r] += q4_qdot16(wu[r], xt, su[r], bu[r], xsum);
      }}
    }}
  }}
#pragma unroll
  for (int m = 0; m < X_ROWS; m++) {{
#pragma unroll
    for (int r = 0; r < {ROWS}; r++) {{
      const float g = q4_warp_sum(acc_g[m][r]);
      const float u = q4_warp_sum(acc_u[m][r]);
      if (lane == 0 && row0 + r < OUT_DIM) {{
        y[m * OUT_DIM + row0 + r] = static_cast<T>(g / (1.0f + expf(-g)) * u);  // silu(g) * u
      }}
    }}
  }}
""").format(**_CONSTANTS)

SOURCES = {"qmv": QMV_SOURCE, "gate_up_silu": GATE_UP_SOURCE}


@functools.cache
def kernel(name: str):
    """The mx.fast.cuda_kernel object for `name` ("qmv" or "gate_up_silu"); MLX builds without
    the CUDA backend refuse to construct it."""
    return mx.fast.cuda_kernel(
        name=f"mlx_mistral_{name}_q4",
        input_names=["x", "w", "scales", "biases"],
        output_names=["y"],
        source=SOURCES[name],
        header=HEADER,
        ensure_row_contiguous=True,
    )
