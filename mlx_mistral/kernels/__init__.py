"""Quantized matmul kernels: a dispatcher per backend and shape, fused projections, and the
Metal/CUDA GEMV sources with the pure-MLX reference they are proven against."""

from .dispatch import backend, choose, gate_up_silu, quantized_matmul  # noqa: F401
from .layers import DispatchedQuantizedLinear, FusedGateUp, FusedLinear, concat_linears, dispatched  # noqa: F401
