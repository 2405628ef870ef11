"""STUB until the native-batch branch lands: one sequence at a time through Model.__call__."""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from ..cache import KVSettings, make_cache


class Backend:
    def __init__(self, model):
        self.model = model
        self.name = "native-cpu" if model.native_decoder() is not None else "mlx"

    def make_cache(self, settings: KVSettings = KVSettings()) -> list:
        return make_cache(self.model, kv_bits=settings.kv_bits, kv_group_size=settings.kv_group_size,
                          max_kv_size=settings.max_kv_size)

    def __call__(self, tokens: mx.array, cache: list) -> mx.array:
        return self.model(tokens, cache=cache)

    def decode(self, tokens: Sequence[int], caches: Sequence[list]) -> mx.array:
        rows = [self.model(mx.array([[t]], dtype=mx.int32), cache=c)[:, -1, :] for t, c in zip(tokens, caches)]
        return mx.concatenate(rows, axis=0)


def backend_for(model, *, native: Optional[bool] = None) -> Backend:
    return Backend(model)
