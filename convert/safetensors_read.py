"""Reading safetensors files one row block at a time.

`safetensors.safe_open` and `mx.load` memory-map the file, so every page a conversion touches
stays in the process's resident set until the file is closed: converting the 47 GB consolidated
file that way shows 47 GB of RSS. Reading each row block with `readinto` keeps the peak at one
block. The format is small: an 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}}`, then the data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import MistralError

# safetensors dtype -> (numpy dtype holding the raw bits, MLX dtype); bf16 has no numpy type,
# so its bits travel as uint16 and are reinterpreted by MLX
DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
}
MAX_HEADER_BYTES = 100 * 1024**2  # the spec's own limit; a larger value means a corrupt file


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live; nothing is read until `read_rows`."""

    file: Path
    name: str
    dtype: str  # safetensors dtype: F32, F16, BF16
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in `file`

    @property
    def itemsize(self) -> int:
        return np.dtype(DTYPES[self.dtype][0]).itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def read_rows(self, start: int, stop: int) -> mx.array:
        """Rows [start, stop) of the tensor (all of it when 1-D), in its stored dtype."""
        rows = self.shape[0]
        row_bytes = self.nbytes // rows if rows else 0
        n = (stop - start) * row_bytes
        buf = bytearray(n)
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * row_bytes)
            got = f.readinto(buf)
        if got != n:
            raise MistralError(f"{self.file} is truncated: tensor {self.name} is cut short")
        np_dtype, mx_dtype = DTYPES[self.dtype]
        array = mx.array(np.frombuffer(buf, dtype=np_dtype).reshape((stop - start,) + self.shape[1:]))
        return array.view(mx_dtype) if array.dtype != mx_dtype else array


def read_header(path: Path) -> dict[str, TensorRef]:
    """The tensors of one safetensors file, every offset checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if n is None or n > min(size - 8, MAX_HEADER_BYTES):
                raise MistralError(f"{path} is not a valid safetensors file (truncated or corrupt header)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MistralError(f"{path} is not a valid safetensors file (corrupt header)") from None
    except OSError as e:
        raise MistralError(f"cannot read {path}: {e.strerror or e}") from e
    if not isinstance(header, dict):
        raise MistralError(f"{path} is not a valid safetensors file (corrupt header)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    refs = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MistralError(f"{path} is not a valid safetensors file (bad entry for {name})") from None
        if dtype not in DTYPES:
            raise MistralError(f"tensor {name} in {path.name} has dtype {dtype}; expected one of "
                               f"{', '.join(DTYPES)} (is the checkpoint already quantized?)")
        ref = TensorRef(path, name, dtype, shape, data_start + begin)
        if end - begin != ref.nbytes:
            raise MistralError(f"{path} is corrupt: tensor {name} has {end - begin} bytes, its shape needs {ref.nbytes}")
        if data_start + end > size:
            raise MistralError(f"{path} is truncated: tensor {name} ends at byte {data_start + end}, "
                               f"the file has {size}")
        refs[name] = ref
    return refs
