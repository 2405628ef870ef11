"""Runs fixed prompts through a model's engine backend (the native CPU decoder where it runs, MLX
ops otherwise), alone or as one rank under mlx.launch, and saves what tests/test_distributed.py
compares: prefill and decode logits, greedy ids, two sequences decoded alone and together in
one batched step, each rank's path and resident weight bytes.

    python tests/distributed_probe.py --model DIR --out FILE.npz [--kv-bits 8]
    mlx.launch -n 2 --backend ring --python PY tests/distributed_probe.py --model DIR --out FILE.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_mistral.cache import make_cache
from mlx_mistral.distributed.group import world
from mlx_mistral.distributed.load import load_sharded_model
from mlx_mistral.distributed.shard import resident_bytes
from mlx_mistral.engine.backend import backend_for
from mlx_mistral.kernels.cpu_model import NativeKVCache
from mlx_mistral.load import load_model

# arbitrary in-vocabulary ids; longer than the native decoder's HEAD_ROWS, so its prefill logits
# come from the lazy head (the MLX graph a sharded model's VocabHead gathers)
PROMPT = [1, 3, 1050, 1115, 2036, 7000, 91, 1032, 4011, 1044, 2027, 1600, 1300, 2500, 1777, 3100, 1042, 6000,
          1201, 1010]
OTHER = [1, 3, 2200, 1234, 1099, 5000, 77]  # a second sequence, shorter: the batch is ragged
DECODE_STEPS = 6
BATCH_STEPS = 3


def run(model, kv_bits):
    """Prefill PROMPT, then decode greedily one token per call."""
    forward = backend_for(model)
    cache = make_cache(model, kv_bits=kv_bits)
    logits = forward(mx.array([PROMPT], dtype=mx.int32), cache)  # (1, T, vocab)
    prefill = logits[0].astype(mx.float32)
    ids, steps = [], []
    y = mx.argmax(logits[0, -1]).item()
    for _ in range(DECODE_STEPS):
        ids.append(y)
        step = forward(mx.array([[y]], dtype=mx.int32), cache)[0, -1].astype(mx.float32)
        steps.append(step)
        y = mx.argmax(step).item()
    ids.append(y)
    native = all(isinstance(c, NativeKVCache) for c in cache)  # the path this run took
    return np.array(prefill), np.array(mx.stack(steps)), np.array(ids), native


def batched(model, kv_bits, together: bool) -> np.ndarray:
    """Logits (2, BATCH_STEPS, vocab) of PROMPT and OTHER decoded greedily through the engine's
    batched step (Backend.decode), both rows in one call or each alone."""
    forward = backend_for(model)
    caches = [make_cache(model, kv_bits=kv_bits) for _ in range(2)]
    ys = [mx.argmax(forward(mx.array([p], dtype=mx.int32), c)[0, -1]).item() for p, c in zip((PROMPT, OTHER), caches)]
    out = [[], []]
    for _ in range(BATCH_STEPS):
        if together:
            rows = [forward.decode(ys, caches)]
        else:
            rows = [forward.decode([y], [c]) for y, c in zip(ys, caches)]
        rows = mx.concatenate(rows).astype(mx.float32)  # (2, vocab)
        for b in range(2):
            out[b].append(np.array(rows[b]))
        ys = [int(i) for i in np.argmax(np.array(rows), axis=-1)]
    return np.array(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kv-bits", type=int, default=None)
    opts = parser.parse_args()
    group = world()
    model = load_sharded_model(Path(opts.model), group) if group else load_model(opts.model)
    prefill, decode, ids, native = run(model, opts.kv_bits)
    alone, together = batched(model, opts.kv_bits, False), batched(model, opts.kv_bits, True)
    mine = np.array([resident_bytes(model), int(native), backend_for(model).name == "native-cpu"], np.int64)
    if group is None:
        ranks = mine[None]
    else:  # every rank's row, on every rank
        rows = mx.zeros((group.size(), 3), dtype=mx.int64).at[group.rank()].add(mx.array(mine))
        ranks = np.array(mx.distributed.all_sum(rows, group=group, stream=mx.cpu))
    if group is None or group.rank() == 0:
        np.savez(opts.out, prefill=prefill, decode=decode, ids=ids, alone=alone, together=together,
                 resident=ranks[:, 0], native=ranks[:, 1], backend_native=ranks[:, 2])


if __name__ == "__main__":
    main()
