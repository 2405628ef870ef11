"""An optimized BLAS under MLX's CPU backend on Linux, loaded before MLX itself.

MLX's Linux wheel links the reference BLAS (dense fp32 matmul ~1.5 GFLOP/s on a 2-core EPYC).
Loading the system OpenBLAS with RTLD_GLOBAL before `mlx.core` is first imported puts its
`cblas_*` symbols first in the process's global lookup scope, so MLX's dense matmuls run there
(~50 GFLOP/s): LD_PRELOAD without a re-exec. Once MLX has been imported it is too late.
Set MLX_MISTRAL_BLAS=reference to keep the wheel's own BLAS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Optional

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",  # Debian/Ubuntu libopenblas0-pthread
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",  # Fedora
)


@functools.cache
def preload() -> Optional[str]:
    """Load OpenBLAS globally if possible; returns its path, or None (the wheel's BLAS)."""
    if sys.platform != "linux" or os.environ.get("MLX_MISTRAL_BLAS") == "reference":
        return None
    if "mlx.core" in sys.modules:
        return None
    found = ctypes.util.find_library("openblas")
    for path in CANDIDATES + ((found,) if found else ()):
        if path.startswith("/") and not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return path
    return None


def describe() -> str:
    """One phrase for --verbose output."""
    if sys.platform != "linux":
        return "platform BLAS"
    path = preload()
    return f"OpenBLAS ({path})" if path else "MLX's bundled reference BLAS (install libopenblas0-pthread for faster dense matmuls)"
