"""KV caches: mlx-lm's cache classes, one object per layer with `update_and_fetch`."""

from __future__ import annotations

from typing import Optional

from mlx_lm.models.cache import (  # noqa: F401  (re-exported for callers)
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)


def make_cache(model, max_kv_size: Optional[int] = None) -> list:
    """One cache per layer: growing by default, a bounded rotating one with `max_kv_size`."""
    if max_kv_size is not None:
        return [RotatingKVCache(max_size=max_kv_size, keep=4) for _ in model.layers]
    return model.make_cache()
