"""Sharded load: every rank reads only its slices of the model folder.

Rank 0 resolves the model (a hub id is downloaded or converted there) and tells the others
which folder and options to load, so the ranks agree even when only rank 0 parsed a command
line. Each rank must have the folder at the same path (the README's "two Macs" recipe copies
it); a rank without it is named in one line on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..config import ModelArgs
from ..errors import MistralError
from .group import agree, broadcast
from .shard import local_args, split_axis, wire
from .slices import SafetensorsFile


def read_slices(folder: Path, model, rank: int, ranks: int) -> dict[str, mx.array]:
    """This rank's part of every tensor the model uses (whole where nothing splits it)."""
    from ..load import weight_files

    weights = {}
    for path in weight_files(folder):
        f = SafetensorsFile(path)
        wanted = model.sanitize(dict.fromkeys(f.names()))  # skips what the model drops unread
        for name in wanted:
            axis = split_axis(name)
            weights[name] = f.slice(name, axis, rank, ranks) if axis is not None else f.slice(name)
    return weights


def load_sharded_model(folder: Path, group, *, dtype: Optional[mx.Dtype] = None):
    """The model of `folder` as this rank's shard, wired with its collectives."""
    from ..load import fill, read_config
    from ..model import Model

    args = ModelArgs.from_dict(read_config(folder))
    model = Model(local_args(args, group.size()))
    fill(model, folder, args, read_slices(folder, model, group.rank(), group.size()), dtype)
    model.fuse()
    wire(model, args, group)
    mx.eval(model.parameters())
    model.eval()
    return model


def rank_config(config: dict, ranks: int) -> dict:
    """config.json as one rank's shard: what the memory planner plans for on each rank."""
    local = local_args(ModelArgs.from_dict(config), ranks)
    return dict(config, num_attention_heads=local.num_attention_heads, num_key_value_heads=local.num_key_value_heads,
                head_dim=local.head_dim, intermediate_size=local.intermediate_size, vocab_size=local.vocab_size)


def _together(group, check) -> None:
    """Run `check` on every rank; if it fails anywhere, every rank raises the same one line."""
    from .group import gone

    error = None
    try:
        check()
    except MistralError as e:
        error = e
    failed = [r for r, ok in enumerate(agree(error is None, group)) if not ok]
    if failed:
        gone()
        if error is not None:
            raise MistralError(f"rank {group.rank()}: {error}") from None
        raise MistralError(f"rank {', '.join(map(str, failed))} could not load the model (see its message)")


def load(path_or_hub_id, group, *, dtype: Optional[mx.Dtype] = None, context: Optional[int] = None,
         kv_bits: Optional[int] = None, kv_group_size: int = 64, max_kv_size: Optional[int] = None):
    """`(model, tokenizer)` on rank 0. The other ranks load the folder rank 0 names, then follow
    its engine (lockstep.follow) until it exits, and exit with it: they never return."""
    from .. import memory
    from ..load import read_config, resolve, weight_files
    from ..tokenizer import load_tokenizer

    leader = group.rank() == 0
    message = None
    if leader:
        options = dict(dtype=str(dtype).split(".")[-1] if dtype is not None else None, context=context,
                       kv_bits=kv_bits, kv_group_size=kv_group_size, max_kv_size=max_kv_size)
        message = ("load", str(resolve(path_or_hub_id)), options)
    message = broadcast(message, group)
    if message[0] == "exit":  # rank 0 ended before it loaded anything
        sys.exit(0)
    _, folder, options = message
    folder = Path(folder)
    dtype = getattr(mx, options["dtype"]) if options["dtype"] else None

    def fits() -> None:
        if not (folder / "config.json").exists():
            raise MistralError(f"the model folder {folder} is missing here: copy it to the same path on every host")
        config = read_config(folder)
        weight_files(folder)
        p = memory.plan(rank_config(config, group.size()), context=options["context"] or 0,
                        kv_bits=options["kv_bits"], kv_group_size=options["kv_group_size"],
                        max_kv_size=options["max_kv_size"], dtype_bytes=dtype.size if dtype is not None else None)
        memory.check_fits(p, memory.machine_budget(), name=f"{folder} (one rank's shard of {group.size()})")

    _together(group, fits)
    memory.raise_wired_limit()
    loaded = []
    _together(group, lambda: loaded.append((load_sharded_model(folder, group, dtype=dtype), load_tokenizer(folder))))
    model, tokenizer = loaded[0]
    if leader:
        return model, tokenizer
    from .lockstep import follow

    follow(model, tokenizer, group)
    sys.exit(0)
