"""Metal sources of the 4-bit decode GEMV and the fused gate/up + SiLU GEMV (Apple GPUs).

Same algorithm and tiling as `reference.py` (read its docstring first) and as the CUDA twin in
`cuda.py`. Compile-time constants come in as template arguments: T (activation dtype),
GROUP_SIZE, IN_DIM (K), OUT_DIM (output rows per part: N, or F for gate/up) and X_ROWS (M).
Beyond MLX's qmv_fast (one weight pass per input row) a launch carries up to 9 input rows, so
a draft-verification step reads each weight once; the gate/up kernel reads the gate and up rows
of the same outputs side by side and writes only silu(g) * u.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from .reference import ROWS, SIMDGROUPS, STEP, VALUES_PER_THREAD

_CONSTANTS = dict(ROWS=ROWS, SIMDGROUPS=SIMDGROUPS, STEP=STEP, VPT=VALUES_PER_THREAD)

HEADER = """
#include <metal_simdgroup>

// 16 consecutive inputs into fp32 registers, the j-th of every four pre-divided by 16**j so a
// nibble masked in place (q * 16**j) needs no shift; returns the plain sum for the bias term.
template <typename T>
inline float q4_load_x16(const device T* x, thread float* xt) {
  float sum = 0.0f;
  for (int i = 0; i < 16; i += 4) {
    const float a = float(x[i]), b = float(x[i + 1]), c = float(x[i + 2]), d = float(x[i + 3]);
    sum += a + b + c + d;
    xt[i] = a;
    xt[i + 1] = b / 16.0f;
    xt[i + 2] = c / 256.0f;
    xt[i + 3] = d / 4096.0f;
  }
  return sum;
}

inline float q4_dot_word(uint word, const thread float* xt) {
  const uint lo = word & 0xffffu, hi = word >> 16;
  return xt[0] * float(lo & 0x000fu) + xt[1] * float(lo & 0x00f0u) + xt[2] * float(lo & 0x0f00u)
       + xt[3] * float(lo & 0xf000u) + xt[4] * float(hi & 0x000fu) + xt[5] * float(hi & 0x00f0u)
       + xt[6] * float(hi & 0x0f00u) + xt[7] * float(hi & 0xf000u);
}

// scale * sum(x * q) + bias * sum(x) over one lane's 16 inputs of one row
inline float q4_qdot16(uint2 wq, const thread float* xt, float scale, float bias, float xsum) {
  return scale * (q4_dot_word(wq.x, xt) + q4_dot_word(wq.y, xt + 8)) + xsum * bias;
}
"""

# Shared prologue: which rows this simdgroup owns and where its lane starts.
_PROLOGUE = """
  constexpr int KW = IN_DIM / 8;           // uint32 words per weight row
  constexpr int KG = IN_DIM / GROUP_SIZE;  // quantization groups per weight row
  const int lane = int(thread_index_in_simdgroup);
  const int row0 = (int(threadgroup_position_in_grid.x) * {SIMDGROUPS}
                    + int(simdgroup_index_in_threadgroup)) * {ROWS};
  if (row0 >= OUT_DIM) {{
    return;  // the whole simdgroup leaves together: no simd_sum waits on it
  }}
"""

QMV_SOURCE = (_PROLOGUE + """
  float acc[X_ROWS][{ROWS}];
  for (int m = 0; m < X_ROWS; m++) {{
    for (int r = 0; r < {ROWS}; r++) {{
      acc[m][r] = 0.0f;
    }}
  }}
  for (int k = lane * {VPT}; k < IN_DIM; k += {STEP}) {{
    uint2 wq[{ROWS}];
    float sc[{ROWS}], bi[{ROWS}];
    for (int r = 0; r < {ROWS}; r++) {{
      const int row = min(row0 + r, OUT_DIM - 1);  // rows past the end are read, never stored
      wq[r] = *((const device uint2*)(w + row * KW + k / 8));
      sc[r] = float(scales[row * KG + k / GROUP_SIZE]);
      bi[r] = float(biases[row * KG + k / GROUP_SIZE]);
    }}
    for (int m = 0; m < X_ROWS; m++) {{  // every input row reuses the weights in registers
      float xt[{VPT}];
      const float xsum = q4_load_x16(x + m * IN_DIM + k, xt);
      for (int r = 0; r < {ROWS}; r++) {{
        acc[m][r] += q4_qdot16(wq[r], xt, sc[r], bi[r], xsum);
      }}
    }}
  }}
  for (int m = 0; m < X_ROWS; m++) {{
    for (int r = 0; r < {ROWS}; r++) {{
      const float v = simd_sum(acc[m][r]);
      if (lane == 0 && row0 + r < OUT_DIM) {{
        y[m * OUT_DIM + row0 + r] = static_cast<T>(v);
      }}
    }}
  }}
""").format(**_CONSTANTS)

# w holds 2 * OUT_DIM rows: gate rows first, then up rows (the fused layout of the model).
GATE_UP_SOURCE = (_PROLOGUE + """
  float acc_g[X_ROWS][{ROWS}], acc_u[X_ROWS][{ROWS}];
  for (int m = 0; m < X_ROWS; m++) {{
    for (int r = 0; r < {ROWS}; r++) {{
      acc_g[m][r] = 0.0f;
      acc_u[m][r] = 0.0f;
    }}
  }}
  for (int k = lane * {VPT}; k < IN_DIM; k += {STEP}) {{
    uint2 wg[{ROWS}], wu[{ROWS}];
    float sg[{ROWS}], bg[{ROWS}], su[{ROWS}], bu[{ROWS}];
    for (int r = 0; r < {ROWS}; r++) {{
      const int g = min(row0 + r, OUT_DIM - 1);  // rows past the end are read, never stored
      const int u = g + OUT_DIM;
      wg[r] = *((const device uint2*)(w + g * KW + k / 8));
      wu[r] = *((const device uint2*)(w + u * KW + k / 8));
      sg[r] = float(scales[g * KG + k / GROUP_SIZE]);
      bg[r] = float(biases[g * KG + k / GROUP_SIZE]);
      su[r] = float(scales[u * KG + k / GROUP_SIZE]);
      bu[r] = float(biases[u * KG + k / GROUP_SIZE]);
    }}
    for (int m = 0; m < X_ROWS; m++) {{
      float xt[{VPT}];
      const float xsum = q4_load_x16(x + m * IN_DIM + k, xt);
      for (int r = 0; r < {ROWS}; r++) {{
        acc_g[m][r] += q4_qdot16(wg[r], xt, sg[r], bg[r], xsum);
        acc_u[m][r] += q4_qdot16(wu[r], xt, su[r], bu[r], xsum);
      }}
    }}
  }}
  for (int m = 0; m < X_ROWS; m++) {{
    for (int r = 0; r < {ROWS}; r++) {{
      const float g = simd_sum(acc_g[m][r]);
      const float u = simd_sum(acc_u[m][r]);
      if (lane == 0 && row0 + r < OUT_DIM) {{
        y[m * OUT_DIM + row0 + r] = static_cast<T>(g / (1.0f + metal::exp(-g)) * u);  // silu(g) * u
      }}
    }}
  }}
""").format(**_CONSTANTS)

SOURCES = {"qmv": QMV_SOURCE, "gate_up_silu": GATE_UP_SOURCE}


@functools.cache
def kernel(name: str):
    """The mx.fast.metal_kernel object for `name` ("qmv" or "gate_up_silu"); building it needs
    no GPU, running it does."""
    return mx.fast.metal_kernel(
        name=f"mlx_mistral_{name}_q4",
        input_names=["x", "w", "scales", "biases"],
        output_names=["y"],
        source=SOURCES[name],
        header=HEADER,
        ensure_row_contiguous=True,
    )
