"""`convert(src, out)`: checkpoint (HF or consolidated, local or hub) -> MLX model folder.

Tensors are read, cast or quantized and written one row block at a time, so peak memory is a
few blocks (~`BLOCK_BYTES` each) whatever the checkpoint's size. Everything is checked before
the first byte is written, and the folder appears at OUT only once it is complete.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol

from ..errors import MistralError
from . import hub
from .quantize import (BITS, DTYPES, GROUP_SIZES, RECIPES, bits_per_weight, output_specs, plan, quantization_config,
                       quantize_block)
from .source import Source, SourceTensor, open_source
from .writer import (SHARD_BYTES, StreamingShardWriter, atomic_output_dir, folder_bytes, remove_stale_partials,
                     write_config)

BLOCK_BYTES = 32 * 1024**2  # float32 bytes per row block: large enough to keep MLX busy, small next to RAM


class Progress(Protocol):
    def start(self, tensors: int, nbytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def tensor_done(self, name: str) -> None: ...


@dataclass
class Result:
    out: Path
    source: Source
    tensors: int
    nbytes: int  # bytes written in shards
    shards: int
    bits_per_weight: float


def row_blocks(t: SourceTensor) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of about BLOCK_BYTES; q/k blocks hold whole heads."""
    rows = t.shape[0]
    if len(t.shape) == 1:
        yield 0, rows
        return
    step = max(1, BLOCK_BYTES // (4 * math.prod(t.shape[1:])))
    if t.rope_head_dim:
        step = max(t.rope_head_dim, step // t.rope_head_dim * t.rope_head_dim)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


# config.json keys that decide the model's math; every folder we write states each of them
MATH_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "max_position_embeddings")


def check_disk_space(out: Path, need: int) -> None:
    """Refuse a conversion the disk cannot hold, after removing what killed earlier runs into
    `out` left beside it; a partial folder still being written counts against the space."""
    freed, live = remove_stale_partials(out)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if need <= free:
        return
    held = sum(folder_bytes(p) for p in live)
    busy = f"; {held / 1e9:.1f} GB of it in {live[0]}, a conversion still running" if live else ""
    raise MistralError(f"not enough disk space for {out}: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
                       + (f" (after removing {freed / 1e9:.1f} GB of interrupted conversions)" if freed else "")
                       + busy)


def check_options(bits: int, group_size: int, dtype: str, recipe: str, quantize: bool) -> None:
    if bits not in BITS:
        raise MistralError(f"--bits must be one of {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise MistralError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}")
    if dtype not in DTYPES:
        raise MistralError(f"--dtype must be one of {', '.join(DTYPES)}")
    if recipe not in RECIPES:
        raise MistralError(f"--recipe must be one of {', '.join(RECIPES)}")
    if recipe != "uniform" and not quantize:
        raise MistralError("--recipe applies to quantized conversions; drop it or --no-quantize")


def convert(
    src: str | Path,
    out: str | Path,
    *,
    bits: int = 4,
    group_size: int = 64,
    quantize: bool = True,
    dtype: str = "bfloat16",
    recipe: str = "uniform",
    force: bool = False,
    progress: Optional[Progress] = None,
    shard_bytes: int = SHARD_BYTES,
) -> Result:
    """Convert checkpoint `src` (a folder or a hub id) into the MLX model folder `out`."""
    check_options(bits, group_size, dtype, recipe, quantize)
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise MistralError(f"{out} exists and is not empty (use --force to replace it)")
    folder = hub.download_source(str(src)) if hub.is_hub_id(src) else Path(src).expanduser()
    source = open_source(folder)
    if out == source.folder.resolve() or out in source.folder.resolve().parents:
        raise MistralError(f"{out} holds the source checkpoint; choose another output folder")

    mx_dtype = DTYPES[dtype]
    shapes = {t.name: t.shape for t in source.tensors}
    quant = plan(list(shapes.items()), source.args.num_hidden_layers, bits=bits, group_size=group_size,
                 recipe=recipe) if quantize else {name: None for name in shapes}
    specs = [s for t in source.tensors for s in output_specs(t.name, t.shape, quant[t.name], mx_dtype)]
    need = sum(math.prod(shape) * d.size for _, shape, d in specs)
    check_disk_space(out, need)

    # the model's math spelled out at the top level, as mlx-lm reads it: a transformers 5 config
    # keeps rope_theta only inside rope_parameters, and mlx-lm's defaults (RoPE base 10000,
    # tied embeddings) would silently change the logits
    config = {**source.config, **{k: v for k, v in source.args.to_hf_dict().items() if k in MATH_KEYS}}
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    if quantize:
        config["quantization"] = quantization_config(quant, bits, group_size)
        config["quantization_config"] = config["quantization"]  # what HF-style readers look for

    try:
        with atomic_output_dir(out, force) as tmp:
            if progress:  # once the folder exists: an error creating it is a line of its own
                progress.start(len(source.tensors), source.nbytes)
            with StreamingShardWriter(tmp, specs, max_bytes=shard_bytes) as writer:
                for t in source.tensors:
                    names = [name for name, _, _ in output_specs(t.name, t.shape, quant[t.name], mx_dtype)]
                    for start, stop in row_blocks(t):
                        w = t.read_rows(start, stop)  # (rows, cols) in HF order, checkpoint dtype
                        for name, block in zip(names, quantize_block(w, quant[t.name], mx_dtype)):
                            writer.write(name, block)
                        if progress:
                            progress.advance(t.ref.nbytes * (stop - start) // t.shape[0])
                    if progress:
                        progress.tensor_done(t.name)
                paths = writer.close()
            write_config(tmp, config)
            for f in source.tokenizer_files:
                shutil.copyfile(f, tmp / f.name)  # follows the HF cache's symlinks
    except OSError as e:
        raise MistralError(f"cannot write {out}: {e.strerror or e}") from e
    return Result(out, source, len(source.tensors), need, len(paths),
                  bits_per_weight(quant, shapes, mx_dtype))


class RichProgress:
    """A rich bar on stderr: tensors done, bytes read, rate and time left."""

    def __init__(self, description: str = "converting"):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.description = description
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.fields[done]}/{task.fields[tensors]} tensors"),
                            DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True))
        self.task = None

    def start(self, tensors: int, nbytes: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task(self.description, total=nbytes, done=0, tensors=tensors)

    def advance(self, nbytes: int) -> None:
        self.bar.advance(self.task, nbytes)

    def tensor_done(self, name: str) -> None:
        task = self.bar.tasks[self.task]
        self.bar.update(self.task, done=task.fields["done"] + 1)

    def __enter__(self) -> "RichProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()
