"""Runs a fixed prompt through a model, alone or as one rank under mlx.launch, and saves what
tests/test_distributed.py compares: prefill and decode logits, greedy ids, resident weight bytes.

    python tests/distributed_probe.py --model DIR --out FILE.npz [--kv-bits 8]
    mlx.launch -n 2 --backend ring --python PY tests/distributed_probe.py --model DIR --out FILE.npz
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

from mlx_mistral.cache import make_cache
from mlx_mistral.distributed.group import world
from mlx_mistral.distributed.load import load_sharded_model
from mlx_mistral.distributed.shard import resident_bytes
from mlx_mistral.load import load_model

PROMPT = [1, 3, 1050, 1115, 2036, 7000, 91, 1032, 4011, 1044, 2027, 1600]  # arbitrary in-vocabulary ids
DECODE_STEPS = 6


def run(model, kv_bits):
    cache = make_cache(model, kv_bits=kv_bits)
    logits = model(mx.array([PROMPT], dtype=mx.int32), cache=cache)  # (1, T, vocab)
    prefill = logits[0].astype(mx.float32)
    ids, steps = [], []
    y = mx.argmax(logits[0, -1]).item()
    for _ in range(DECODE_STEPS):
        ids.append(y)
        step = model(mx.array([[y]], dtype=mx.int32), cache=cache)[0, -1].astype(mx.float32)
        steps.append(step)
        y = mx.argmax(step).item()
    ids.append(y)
    return np.array(prefill), np.array(mx.stack(steps)), np.array(ids)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kv-bits", type=int, default=None)
    opts = parser.parse_args()
    group = world()
    if group is None:
        model = load_model(opts.model)
        model.native = False
        rank, sizes = 0, [resident_bytes(model)]
    else:
        from pathlib import Path

        model = load_sharded_model(Path(opts.model), group)
        rank = group.rank()
        mine = mx.zeros((group.size(),), dtype=mx.int64).at[rank].add(resident_bytes(model))
        sizes = np.array(mx.distributed.all_sum(mine, group=group, stream=mx.cpu)).tolist()
    prefill, decode, ids = run(model, opts.kv_bits)
    if rank == 0:
        np.savez(opts.out, prefill=prefill, decode=decode, ids=ids, resident=np.array(sizes))


if __name__ == "__main__":
    main()
