"""Load-time fusion: projections that read the same input become one matrix.

q/k/v (and gate/up) are concatenated along the output dimension, weights with their scales and
biases, so every backend reads one matrix with one call where mlx-lm makes three (or two plus
an elementwise SiLU-multiply pass). Quantization groups run along the input dimension, so the
concatenation of quantized rows is exactly the quantization of the concatenated rows.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from . import dispatch


class DispatchedQuantizedLinear(nn.QuantizedLinear):
    """An nn.QuantizedLinear (same parameters and names) whose matmul goes through the dispatcher."""

    @classmethod
    def from_parts(cls, weight: mx.array, scales: mx.array, biases: Optional[mx.array], bias: Optional[mx.array],
                   *, group_size: int, bits: int, mode: str) -> "DispatchedQuantizedLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)  # not QuantizedLinear.__init__: it quantizes a random matrix first
        layer.group_size, layer.bits, layer.mode = group_size, bits, mode
        layer.weight, layer.scales, layer.biases = weight, scales, biases
        if bias is not None:
            layer.bias = bias
        layer.freeze()
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        return dispatch.linear(self, x)


class FusedLinear(nn.Module):
    """Several projections of one input as one matrix; returns the parts (q, k, v)."""

    def __init__(self, linear: nn.Module, sizes: Sequence[int]):
        super().__init__()
        self.linear = linear
        self.sizes = tuple(sizes)

    def __call__(self, x: mx.array) -> list[mx.array]:
        y = dispatch.linear(self.linear, x)  # (..., sum(sizes))
        cuts = [sum(self.sizes[: i + 1]) for i in range(len(self.sizes) - 1)]
        return mx.split(y, cuts, axis=-1)


class FusedGateUp(nn.Module):
    """The [gate; up] projection with its SwiGLU epilogue: x -> silu(x·Wg) * (x·Wu)."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def __call__(self, x: mx.array) -> mx.array:
        return dispatch.gate_up_linear(self.linear, x)  # (..., F)


def dispatched(layer: nn.Module) -> nn.Module:
    """A plain nn.QuantizedLinear as a DispatchedQuantizedLinear; anything else unchanged."""
    if type(layer) is not nn.QuantizedLinear:
        return layer
    return DispatchedQuantizedLinear.from_parts(
        layer["weight"], layer["scales"], layer.get("biases"), layer.get("bias"),
        group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


def concat_linears(parts: Sequence[nn.Module]) -> Optional[nn.Module]:
    """One layer computing all of `parts` (rows of part 0, then part 1, ...), or None when they
    cannot share a matrix (different quantization, or some quantized and some not)."""
    has_bias = {"bias" in p for p in parts}
    if len(has_bias) != 1:
        return None
    bias = mx.concatenate([p["bias"] for p in parts]) if has_bias == {True} else None
    if all(type(p) is nn.Linear for p in parts):
        layer = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(layer)  # not Linear.__init__: it draws a random matrix first
        layer.weight = mx.concatenate([p["weight"] for p in parts])
        if bias is not None:
            layer.bias = bias
        return layer
    if not all(isinstance(p, nn.QuantizedLinear) for p in parts):
        return None
    formats = {(p.group_size, p.bits, p.mode, p.get("biases") is not None) for p in parts}
    if len(formats) != 1:  # mixed recipes quantize projections differently
        return None
    group_size, bits, mode, has_biases = formats.pop()
    return DispatchedQuantizedLinear.from_parts(
        mx.concatenate([p["weight"] for p in parts]),
        mx.concatenate([p["scales"] for p in parts]),
        mx.concatenate([p["biases"] for p in parts]) if has_biases else None,
        bias, group_size=group_size, bits=bits, mode=mode)
