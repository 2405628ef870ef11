"""Read parts of safetensors tensors without reading the rest.

A rank of a sharded model needs a 1/N slice of most tensors. `mx.load` materialises a whole
tensor before it can be sliced, so a 16 GB Mac would briefly hold the full matrix; instead the
file is memory-mapped (the header says where each tensor lives) and only the slice is copied
into an MLX array. bfloat16 has no numpy dtype: it travels as uint16 and is viewed back.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import MistralError

# safetensors dtype -> (numpy dtype to read as, MLX dtype to view as, or None when numpy's is right)
DTYPES = {
    "F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, None), "I32": (np.int32, None), "U8": (np.uint8, None), "I8": (np.int8, None),
    "I64": (np.int64, None), "U16": (np.uint16, None), "I16": (np.int16, None),
}


class SafetensorsFile:
    """One .safetensors file, memory-mapped; `slice(name, axis, part, parts)` reads a part."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MistralError(f"cannot read {self.path}: {e}") from e
        header.pop("__metadata__", None)
        self.header = header
        self.start = 8 + size  # the data buffer follows the header
        self.map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def _view(self, name: str) -> tuple[np.ndarray, Optional[mx.Dtype]]:
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise MistralError(f"{self.path.name}: tensor {name} has dtype {info['dtype']}, which cannot be sharded")
        np_dtype, mx_dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        raw = self.map[self.start + begin: self.start + end]
        return raw.view(np_dtype).reshape(info["shape"]), mx_dtype

    def slice(self, name: str, axis: Optional[int] = None, part: int = 0, parts: int = 1) -> mx.array:
        """Part `part` of `parts` equal parts of `name` along `axis` (None: the whole tensor)."""
        array, mx_dtype = self._view(name)
        if axis is not None:
            n = array.shape[axis]
            if n % parts:
                raise MistralError(f"{name}: dimension {axis} ({n}) does not split into {parts} equal parts")
            step = n // parts
            index = [slice(None)] * array.ndim
            index[axis] = slice(part * step, (part + 1) * step)
            array = array[tuple(index)]
        out = mx.array(np.ascontiguousarray(array))  # copies only the slice out of the mapping
        return out.view(mx_dtype) if mx_dtype is not None else out
