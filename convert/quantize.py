"""Which tensors get quantized at what width, and what that writes.

MLX affine quantization: each group of `group_size` weights along a row stores `bits`-bit codes
packed into uint32 plus one scale and one bias (in the model dtype). The folder's config.json
records it the way mlx-lm reads it: `{"group_size": 64, "bits": 4, "mode": "affine",
"<module path>": {"group_size": .., "bits": .., "mode": "affine"}}` for layers that differ.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
RECIPES = ("uniform", "mixed")
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
MIXED_HIGH_BITS = 6  # llama.cpp's Q4_K_M and mlx-lm's mixed_4_6 use 6 bits for the sensitive set


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int

    def as_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


def _layer_index(name: str) -> Optional[int]:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def sensitive_layer(i: int, n_layers: int) -> bool:
    """Layers whose v_proj/down_proj get more bits in the mixed recipe: the first and last
    eighth, where errors matter most, and every third layer in between (llama.cpp's Q4_K_M
    rule, also mlx-lm's mixed recipes)."""
    return i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2


def plan(names_shapes: list[tuple[str, tuple[int, ...]]], n_layers: int, *, bits: int, group_size: int,
         recipe: str = "uniform") -> dict[str, Optional[QuantSpec]]:
    """HF weight name -> its quantization (None: kept in the model dtype).

    Only 2-D weights (Linear and Embedding layers) whose rows split into whole groups are
    quantized, as mlx-lm does; norms stay in the model dtype. The mixed recipe raises to
    `MIXED_HIGH_BITS` the embedding and output head (a 131k-row table each: their error hits
    every token) and v_proj/down_proj of the sensitive layers: both write straight into the
    residual stream, so their error is not averaged away by a later projection.
    """
    base = QuantSpec(bits, group_size)
    high = QuantSpec(max(bits, MIXED_HIGH_BITS), group_size)
    out: dict[str, Optional[QuantSpec]] = {}
    for name, shape in names_shapes:
        if len(shape) != 2 or shape[-1] % group_size:
            out[name] = None
            continue
        spec = base
        if recipe == "mixed":
            i = _layer_index(name)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                spec = high
            elif i is not None and name.endswith(("v_proj.weight", "down_proj.weight")) and sensitive_layer(i, n_layers):
                spec = high
        out[name] = spec
    return out


def quantization_config(plan_: dict[str, Optional[QuantSpec]], bits: int, group_size: int) -> dict:
    """The config.json `quantization` entry: defaults plus per-layer overrides."""
    config = QuantSpec(bits, group_size).as_config()
    for name, spec in plan_.items():
        if spec is not None and spec != QuantSpec(bits, group_size):
            config[name.removesuffix(".weight")] = spec.as_config()
    return config


def output_specs(name: str, shape: tuple[int, ...], spec: Optional[QuantSpec], dtype: mx.Dtype):
    """The tensors one source weight becomes: [(name, shape, dtype)]."""
    if spec is None:
        return [(name, shape, dtype)]
    rows, cols = shape
    base = name.removesuffix(".weight")
    groups = cols // spec.group_size
    return [(f"{base}.weight", (rows, cols * spec.bits // 32), mx.uint32),
            (f"{base}.scales", (rows, groups), dtype),
            (f"{base}.biases", (rows, groups), dtype)]


def quantize_block(w: mx.array, spec: Optional[QuantSpec], dtype: mx.Dtype) -> list[mx.array]:
    """One row block of a weight, as the arrays `output_specs` names (same order).

    The block is cast to the model dtype first, as mlx-lm does, so a bf16 checkpoint
    quantizes to the same codes, scales and biases as `mlx_lm.convert` gives."""
    w = w.astype(dtype)
    if spec is None:
        return [w]
    wq, scales, biases = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
    return [wq, scales, biases]


def bits_per_weight(plan_: dict[str, Optional[QuantSpec]], shapes: dict[str, tuple[int, ...]], dtype: mx.Dtype) -> float:
    """Stored bits per parameter: codes plus the scale and bias of each group."""
    total_bits = total = 0
    for name, spec in plan_.items():
        n = math.prod(shapes[name])
        total += n
        if spec is None:
            total_bits += n * dtype.size * 8
        else:
            total_bits += n * spec.bits + 2 * (n // spec.group_size) * dtype.size * 8
    return total_bits / total
