"""Writing a model folder: tensors streamed into ~5 GB shards, published atomically."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import struct
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

from ..errors import MistralError

SHARD_BYTES = 5 * 1024**3  # the same shard size HF and mlx-lm write
SAFETENSORS_DTYPES = {mx.uint32: "U32", mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32"}


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
        paths = []
        for i in range(n):
            final = self.folder / shard_name(i, n)
            (self.folder / f"shard-{i:05d}.tmp.safetensors").rename(final)
            paths.append(final)
        write_index(self.folder, self.shards, self.total_bytes)
        return paths


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_index(folder: Path, shards: list[list[str]], total_bytes: int) -> None:
    """`model.safetensors.index.json`: which shard holds each tensor."""
    weight_map = {name: shard_name(i, len(shards)) for i, names in enumerate(shards) for name in names}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class StreamingShardWriter:
    """Writes tensors whose names, shapes and dtypes are known up front straight to their place
    on disk, one row block at a time.

    Every shard's header is written first, so a block goes out as soon as it is computed and
    memory holds one block rather than a 5 GB shard (which `ShardWriter` buffers). Use as a
    context manager: the files are closed however the block ends.
    """

    def __init__(self, folder: Path, specs: list[tuple[str, tuple[int, ...], mx.Dtype]],
                 max_bytes: int = SHARD_BYTES, metadata_format: str = "mlx"):
        self.folder = Path(folder)
        shards: list[list[tuple[str, tuple[int, ...], mx.Dtype]]] = [[]]
        size = 0
        for name, shape, dtype in specs:
            nbytes = math.prod(shape) * dtype.size
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        self.shards = [[name for name, _, _ in shard] for shard in shards]
        self.total_bytes = sum(math.prod(shape) * dtype.size for _, shape, dtype in specs)
        self.files: list = []
        # name -> [file index, next byte offset, bytes still to write, shape, dtype]
        self.slots: dict[str, list] = {}
        for i, shard in enumerate(shards):
            self._start_shard(i, shard, metadata_format)

    def _start_shard(self, i: int, shard: list, metadata_format: str) -> None:
        header, offset = {}, 0
        for name, shape, dtype in shard:
            nbytes = math.prod(shape) * dtype.size
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": metadata_format}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the spec asks
        f = open(self.folder / shard_name(i, len(self.shards)), "wb")
        self.files.append(f)
        f.write(struct.pack("<Q", len(blob)) + blob)
        data_start = 8 + len(blob)
        f.truncate(data_start + offset)
        for name, shape, dtype in shard:
            nbytes = math.prod(shape) * dtype.size
            self.slots[name] = [i, data_start + header[name]["data_offsets"][0], nbytes, shape, dtype]

    def write(self, name: str, block: mx.array) -> None:
        """Append the next rows of tensor `name` (all of it for a 1-D tensor)."""
        i, offset, left, shape, dtype = self.slots[name]
        if block.dtype != dtype or tuple(block.shape[1:]) != shape[1:] or block.nbytes > left:
            raise ValueError(f"block {block.dtype}{tuple(block.shape)} does not fit tensor {name} {dtype}{shape}")
        block = mx.contiguous(block)
        mx.eval(block)
        f = self.files[i]
        f.seek(offset)
        f.write(memoryview(block))
        self.slots[name][1:3] = [offset + block.nbytes, left - block.nbytes]

    def close(self) -> list[Path]:
        """Check every tensor was written in full, close the shards, write the index."""
        unfinished = [name for name, slot in self.slots.items() if slot[2]]
        if unfinished:
            raise ValueError(f"tensor {unfinished[0]} was not written in full")
        self._close_files()
        write_index(self.folder, self.shards, self.total_bytes)
        return [self.folder / shard_name(i, len(self.shards)) for i in range(len(self.shards))]

    def _close_files(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "StreamingShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._close_files()


# Signals whose default action ends the process: each becomes an exception while a folder is
# being written, so the partial folder is removed as on Ctrl-C. SIGKILL cannot be caught: its
# leftovers are removed by the next run into the same destination (`remove_stale_partials`).
CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
                        if hasattr(signal, name))


class Terminated(BaseException):
    """A termination signal arrived while an output folder was being written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Within the block, termination signals raise `Terminated` (main thread only: Python
    delivers signals there; handlers a program installed itself are left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in CLEANUP_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def partial_prefix(out: Path) -> str:
    return f".{out.name}."


def _pid_of(partial: Path, out: Path) -> Optional[int]:
    """The writer's process id, from `.NAME.PID.xxxx.partial` (None for an older name)."""
    head = partial.name[len(partial_prefix(out)):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def partials_of(out: Path) -> list[Path]:
    """Temporary folders of earlier writes into `out` (finished or not) beside it."""
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.glob(partial_prefix(out) + "*.partial") if p.is_dir())


def remove_stale_partials(out: str | Path) -> tuple[int, list[Path]]:
    """Remove what killed writes into `out` left behind (a SIGKILL, a power cut): returns the
    bytes freed and the partial folders still being written by a live process."""
    out = Path(out).expanduser().resolve()
    freed, live = 0, []
    for partial in partials_of(out):
        pid = _pid_of(partial, out)
        if pid is not None and pid != os.getpid() and _alive(pid):
            live.append(partial)
            continue
        freed += folder_bytes(partial)
        shutil.rmtree(partial, ignore_errors=True)
    return freed, live


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; it becomes `out` only if the block succeeds.

    On any error, Ctrl-C or a termination signal the temporary folder is removed and `out` is
    untouched; leftovers of killed earlier runs into `out` are removed first. An OSError (a
    read-only parent, a full disk) is one MistralError line.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise MistralError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise MistralError(f"{out} exists and is not empty (use --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out)
        tmp = Path(tempfile.mkdtemp(prefix=f"{partial_prefix(out)}{os.getpid()}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise MistralError(f"cannot write {out}: {e.strerror or e}") from e
    try:
        with _signals_raise():
            tmp.chmod(0o755)  # mkdtemp makes it private; the published folder is an ordinary one
            yield tmp
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MistralError(f"cannot write {out}: {e.strerror or e}") from e
    except Terminated as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(128 + e.signum) from e  # the shell's code for "ended by this signal"
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_config(folder: Path, config: dict) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
