"""The collectives of a sharded model on the native CPU decoder (kernels/cpu_model.py).

The C decoder runs this rank's slice of every layer in one call, as it runs a whole model; the
two all_sums per layer (after the o and the down projection, shard.py's `SumAcross`) are a
callback from C into MLX's own collective, on the calling thread, between the decoder's pool
jobs. The embedding's sum and the head's gather run in Python around the C call. The ranks
step in lockstep (lockstep.py), so every rank makes the same calls in the same order and the
collectives pair up as they do on the MLX-ops path, with the same sizes (float32 rows).
"""

from __future__ import annotations

import ctypes
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

# int reduce(void* ctx, float* buf, int64_t n): cpu_model.h's mm_model.reduce
REDUCE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class NativeCollectives:
    """One sharded model's sums and gathers for the native decoder (see the module's doc)."""

    def __init__(self, model):
        self.group = model.group
        embed = model.model.embed_tokens  # shard.VocabEmbedding: rows [start, start + rows) live here
        self.start, self.rows = embed.start, embed.rows
        self.vocab = model.args.vocab_size
        self.error: Optional[BaseException] = None  # why the last reduce failed (C only sees -2)
        self.reduce = REDUCE(self._reduce)  # held here: C keeps only its address

    def _reduce(self, _ctx, buf: int, n: int) -> int:
        try:
            view = np.ctypeslib.as_array(ctypes.cast(buf, ctypes.POINTER(ctypes.c_float)), shape=(n,))
            view[:] = self.sum(view)
            return 0
        except Exception as e:  # noqa: BLE001  (an exception cannot cross C: the decoder raises it after the call)
            self.error = e
            return 1

    def failure(self) -> BaseException:
        """The exception of the reduce that ended the last C call (read once)."""
        error, self.error = self.error, None
        return error or RuntimeError("an all_sum of the sharded model failed")

    def sum(self, x: np.ndarray) -> np.ndarray:
        """x summed over the ranks (float32, any shape)."""
        total = mx.distributed.all_sum(mx.array(x), group=self.group, stream=mx.cpu)
        mx.eval(total)
        return np.asarray(total)

    def embed(self, ids: np.ndarray, lookup: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Embedding rows (M, hidden) of `ids`: each rank looks up the ids it owns through
        `lookup` (local row numbers -> float32 rows), zeros for the others, and the sum joins them."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"token id out of range 0..{self.vocab - 1}")
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        x = lookup(np.where(mine, local, 0).astype(np.int32))
        x[~mine] = 0.0
        return self.sum(x)

    def gather(self, logits: np.ndarray) -> mx.array:
        """This rank's logits (rows, vocab / N) -> every rank's, in rank order: (rows, vocab)."""
        # all_gather stacks axis 0: gather (vocab / N, rows) slices into (vocab, rows)
        full = mx.distributed.all_gather(mx.array(np.ascontiguousarray(logits.T)), group=self.group, stream=mx.cpu)
        full = mx.contiguous(full.T)
        mx.eval(full)  # now, on every rank, as the C call's sums ran: never left for a later read
        return full
