"""The two questions benchmarks/distributed.py answers besides tensor parallel's own speed.

1. Which path a sharded model takes on the CPU. Tensor parallel runs on MLX ops today (the
   all_sums sit between MLX ops). The other path is the native decoder cut into segments with
   an all_sum between them. That path's cost per token is estimated as the native decoder on a
   model of exactly one rank's shard, in one process on one core (its weights read from the
   folder as rank 0 reads them, no collectives), plus the measured all_sum latency times the
   all_sums a token needs (two per layer, one for the embedding, one gather for the head).
   The same shard on MLX ops, alone, gives the compute the measured 2-rank run pays for.

2. Whether pipeline parallel helps: rank 0 runs the embedding and the first half of the layers,
   sends the hidden state to rank 1, which runs the second half and the head and sends the
   sampled id back. Each rank reads half the weights, one after the other: a single stream
   decodes at one process's speed plus two hops, where tensor parallel splits every layer's
   reads across the ranks and pays two all_sums per layer.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx

RANKS = 2


def shard_alone(folder: Path, prompt_len: int, tokens: int) -> dict:
    """Rank 0's shard of RANKS, without collectives, in this process: native decoder against
    MLX ops, prefill and decode; and the whole model on the native decoder for reference."""
    from mlx_mistral.config import ModelArgs
    from mlx_mistral.distributed.load import read_slices
    from mlx_mistral.distributed.shard import local_args
    from mlx_mistral.engine.backend import Backend
    from mlx_mistral.load import fill, load_model, read_config
    from mlx_mistral.model import Model

    args = ModelArgs.from_dict(read_config(folder))
    shard = Model(local_args(args, RANKS))
    fill(shard, folder, args, read_slices(folder, shard, 0, RANKS), None)
    shard.fuse()
    mx.eval(shard.parameters())
    shard.eval()
    out = {name: timed(Backend(shard, native=native), prompt_len, tokens)
           for name, native in (("shard_native", True), ("shard_mlx", False))}
    out["whole_native"] = timed(Backend(load_model(folder), native=True), prompt_len, tokens)
    return out


def timed(backend, prompt_len: int, tokens: int) -> dict:
    """Prefill of `prompt_len` random ids, then `tokens` one-row decode steps (the engine's
    call), after one untimed pass of each."""
    vocab = backend.model.args.vocab_size
    prompt = mx.random.randint(100, vocab, (1, prompt_len), key=mx.random.key(0)).astype(mx.int32)
    for _ in range(2):  # the first pass warms buffers; the second is timed
        cache = backend.make_cache()
        tic = time.perf_counter()
        y = mx.argmax(backend(prompt, cache)[0, -1]).item()
        prefill = time.perf_counter() - tic
    backend.decode([y], [cache])
    tic = time.perf_counter()
    for _ in range(tokens):
        y = mx.argmax(backend.decode([y], [cache])[0]).item()
    decode = time.perf_counter() - tic
    return {"backend": backend.name, "prefill_tps": prompt_len / prefill, "decode_ms": 1e3 * decode / tokens}


def pipeline(folder: Path, prompt_len: int, tokens: int, group) -> dict:
    """Two pipeline stages (layers split in half) on two ranks: prefill and decode timed on
    rank 0, which sees the whole round trip."""
    from mlx_mistral.load import load_model

    model = load_model(folder)  # each rank runs only its half (memory is not what is measured here)
    rank, n = group.rank(), len(model.model.layers)
    lo, hi = (0, n // 2) if rank == 0 else (n // 2, n)
    prompt = mx.random.randint(100, model.args.vocab_size, (1, prompt_len), key=mx.random.key(0)).astype(mx.int32)
    for _ in range(2):  # the first pass warms buffers; the second is timed
        cache = model.make_cache()
        tic = time.perf_counter()
        y = _stage(model, prompt if rank == 0 else None, prompt_len, cache, lo, hi, group)
        prefill = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(tokens):
        y = _stage(model, mx.array([[y]], dtype=mx.int32) if rank == 0 else None, 1, cache, lo, hi, group)
    decode = time.perf_counter() - tic
    return {"prefill_tps": prompt_len / prefill, "decode_ms": 1e3 * decode / tokens}


def _stage(model, ids, length: int, cache: list, lo: int, hi: int, group) -> int:
    """One forward of this rank's stage; rank 0 gets the greedy id back from the last stage."""
    from mlx_lm.models.base import create_attention_mask

    first = group.rank() == 0
    inner = model.model
    if first:
        h = inner.embed(ids)  # (1, T, hidden)
    else:
        h = mx.distributed.recv((1, length, model.args.hidden_size), inner.norm.weight.dtype, 0, group=group)
    mask = create_attention_mask(h, cache[lo])
    for layer, layer_cache in zip(inner.layers[lo:hi], cache[lo:hi]):
        h = layer(h, mask, layer_cache)
    if first:
        mx.eval(mx.distributed.send(h, 1, group=group))
        return mx.distributed.recv((1,), mx.int32, 1, group=group).item()
    y = mx.argmax(model.head(inner.norm(h))[:, -1], axis=-1).astype(mx.int32)  # (1,)
    mx.eval(mx.distributed.send(y, 0, group=group))
    return y.item()


def paper_pipeline(single_s: float, n: int, latency: float, hidden: int, bandwidth: float) -> float:
    """Seconds per token of one stream on an n-stage pipeline: every stage reads its 1/n of the
    weights in turn (the single-machine time), plus n hops: n - 1 hidden states forward and the
    sampled id back to the first stage."""
    return single_s + (n - 1) * (latency + hidden * 2 / bandwidth) + latency


def break_even_latency(single_s: float, n: int, layers: int) -> float:
    """The per-hop latency at which tensor parallel (single / n + (2 layers + 1) ring all_sums
    of 2(n - 1) hops each) costs as much per token as the pipeline (single + n hops)."""
    hops_tp = (2 * layers + 1) * 2 * (n - 1)
    return single_s * (1 - 1 / n) / (hops_tp - n)
