"""Writing a model folder: tensors streamed into ~5 GB shards, published atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from ..errors import MistralError

SHARD_BYTES = 5 * 1024**3  # the same shard size HF and mlx-lm write


class ShardWriter:
    """Accepts tensors one at a time, writes a shard whenever ~`max_bytes` are buffered, and
    names them `model-0000K-of-0000N.safetensors` with an index once the count is known."""

    def __init__(self, folder: Path, max_bytes: int = SHARD_BYTES, metadata_format: str = "mlx"):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.metadata = {"format": metadata_format}
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, array: mx.array) -> None:
        if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = array
        self.pending_bytes += array.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.shards):05d}.tmp.safetensors"
        mx.save_safetensors(str(path), self.pending, metadata=self.metadata)
        self.shards.append(list(self.pending))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is left, rename the shards to their final names, write the index."""
        self.flush()
        n = len(self.shards)
        weight_map, paths = {}, []
        for i, names in enumerate(self.shards):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"shard-{i:05d}.tmp.safetensors").rename(final)
            paths.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return paths


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; it becomes `out` only if the block succeeds.

    On any error (Ctrl-C included) the temporary folder is removed and `out` is untouched.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise MistralError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise MistralError(f"{out} exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_config(folder: Path, config: dict) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
