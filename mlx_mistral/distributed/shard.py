"""Tensor-parallel sharding of the Mistral model: which slice of each tensor a rank holds, and
the collectives that join the slices.

Megatron's split, as mlx-lm's `Model.shard` does it: q/k/v and gate/up are split by output rows
(each rank owns whole heads and a slice of the FFN; no communication), o and down by input
columns, followed by an all_sum of the partial products. Two all_sums per layer.

The embedding and the head are split too, by vocabulary rows: the embedding's lookups are
summed across ranks (a rank contributes zeros for ids outside its rows) and the head's logits
gathered. Keeping them whole is simpler but costs every rank the full 2 x vocab x hidden matrix:
on the small preset that is 36% of all weights, so each rank would hold 68% of the model, and on
Mistral Small 3 (5.7%) it would cost ~0.4 GB per rank and the head's full read on every token,
against a gather of vocab x 4 bytes (0.5 MB) of logits per decoded row.

A rank builds the model from a *local* ModelArgs (heads, FFN width and vocabulary divided by
the rank count), so every module has its slice's shape and `load_weights(strict=True)` checks
each slice; `model.args` is then set back to the whole model's, which is what the engine reads
(`model.local_args` keeps the slice's shapes, which the native decoder reads).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelArgs
from ..errors import MistralError
from ..kernels.layers import DispatchedQuantizedLinear
from ..model import embedding_rows

# tensor-name patterns -> the axis a rank slices (0: output rows, -1: input columns)
SPLIT_AXES = [
    (re.compile(r"\.self_attn\.(q|k|v)_proj\.(weight|scales|biases|bias)$"), 0),
    (re.compile(r"\.mlp\.(gate|up)_proj\.(weight|scales|biases|bias)$"), 0),
    (re.compile(r"\.self_attn\.o_proj\.(weight|scales|biases)$"), -1),
    (re.compile(r"\.mlp\.down_proj\.(weight|scales|biases)$"), -1),
    (re.compile(r"^model\.embed_tokens\.(weight|scales|biases)$"), 0),
    (re.compile(r"^lm_head\.(weight|scales|biases)$"), 0),
]
UNSUPPORTED = re.compile(r"\.(o_proj|down_proj)\.bias$")  # a row-parallel bias must be added once


def split_axis(name: str) -> Optional[int]:
    """The axis `name` is sliced along on every rank, or None when each rank keeps it whole."""
    if UNSUPPORTED.search(name):
        raise MistralError(f"{name}: a bias on a row-parallel projection cannot be sharded")
    for pattern, axis in SPLIT_AXES:
        if pattern.search(name):
            return axis
    return None


def check_ranks(args: ModelArgs, ranks: int) -> None:
    """One line when `ranks` cannot split this model's heads, FFN or vocabulary evenly."""
    sizes = {"KV heads": args.num_key_value_heads, "query heads": args.num_attention_heads,
             "intermediate_size": args.intermediate_size, "vocab_size": args.vocab_size}
    for what, n in sizes.items():
        if n % ranks:
            valid = [k for k in range(1, args.num_key_value_heads + 1) if args.num_key_value_heads % k == 0]
            raise MistralError(f"{ranks} ranks do not divide the model's {n} {what}: run on "
                               f"{' or '.join(map(str, valid))} ranks")


def local_args(args: ModelArgs, ranks: int) -> ModelArgs:
    """The shapes one rank holds: 1/ranks of the heads, the FFN and the vocabulary."""
    check_ranks(args, ranks)
    return dataclasses.replace(
        args, num_attention_heads=args.num_attention_heads // ranks,
        num_key_value_heads=args.num_key_value_heads // ranks, head_dim=args.head_dim,
        intermediate_size=args.intermediate_size // ranks, vocab_size=args.vocab_size // ranks)


class SumAcross(nn.Module):
    """A row-parallel projection: this rank's partial product, summed over the ranks."""

    def __init__(self, linear: nn.Module, group):
        super().__init__()
        self.linear = linear
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.linear(x), group=self.group)


class VocabEmbedding(nn.Module):
    """An embedding whose rows [start, start + rows) live here: each rank looks up the ids it
    owns, contributes zeros for the others, and the all_sum assembles every row."""

    def __init__(self, embed: nn.Module, start: int, group, dtype: mx.Dtype):
        super().__init__()
        self.embed = embed
        self.dtype = dtype  # the compute dtype the rows are dequantized in
        self.start, self.rows = start, embed["weight"].shape[0]  # packed or not, rows are vocabulary ids
        self.group = group

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)  # (B, T)
        h = embedding_rows(self.embed, mx.where(mine, local, 0), self.dtype)  # (B, T, hidden)
        return mx.distributed.all_sum(h * mine[..., None].astype(h.dtype), group=self.group)


class VocabHead(nn.Module):
    """The output head over this rank's vocabulary rows; the logits are gathered in rank order."""

    def __init__(self, linear: nn.Module, group):
        super().__init__()
        self.linear = linear
        self.group = group

    def __call__(self, h: mx.array) -> mx.array:
        logits = mx.moveaxis(self.linear(h), -1, 0)  # (V / N, B, T): all_gather stacks axis 0
        return mx.moveaxis(mx.distributed.all_gather(logits, group=self.group), 0, -1)  # (B, T, V)


def tied_head(embed: nn.Module) -> nn.Module:
    """A linear layer reading the (local) embedding matrix itself: no copy."""
    if isinstance(embed, nn.QuantizedEmbedding):
        return DispatchedQuantizedLinear.from_parts(embed["weight"], embed["scales"], embed.get("biases"), None,
                                                    group_size=embed.group_size, bits=embed.bits,
                                                    mode=getattr(embed, "mode", "affine"))
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)  # not Linear.__init__: it draws a random matrix first
    layer.weight = embed["weight"]
    return layer


def wire(model, args: ModelArgs, group) -> None:
    """Put the collectives in a model built from `local_args` and loaded with this rank's
    slices (run after `fuse()`); `model.args` becomes the whole model's again."""
    rank, ranks = group.rank(), group.size()
    for layer in model.layers:
        layer.self_attn.o_proj = SumAcross(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = SumAcross(layer.mlp.down_proj, group)
    embed = model.model.embed_tokens
    head = tied_head(embed) if args.tie_word_embeddings else model.lm_head
    model.model.embed_tokens = VocabEmbedding(embed, rank * args.vocab_size // ranks, group,
                                              model.model.norm.weight.dtype)
    model.lm_head = VocabHead(head, group)
    # the head is its own module now, also for tied embeddings
    model.args = dataclasses.replace(args, tie_word_embeddings=False)
    model.group = group  # the native decoder sums and gathers through it too (distributed/native.py)


def resident_bytes(model) -> int:
    """Bytes of the model's arrays, each counted once (a tied head shares the embedding's)."""
    seen, total = set(), 0
    for _, array in nn.utils.tree_flatten(model.parameters()):
        if id(array) not in seen:
            seen.add(id(array))
            total += array.nbytes
    return total
