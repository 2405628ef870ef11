"""KV caches and the prompt cache of a conversation.

The per-layer caches are mlx-lm's classes (one object per layer with `update_and_fetch`):
`KVCache` grows in preallocated steps of 256 tokens, `QuantizedKVCache` stores K and V with
`mx.quantize` (mlx-lm's attention reads it with quantized matmuls), `RotatingKVCache` keeps a
bounded window. `ConversationCache` adds the token ids those caches hold, so a new request
only computes what differs from the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from mlx_lm.models.cache import (  # noqa: F401  (re-exported for callers)
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)

from .errors import MistralError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
# a rotating cache keeps the first tokens (BOS, the start of the system prompt) as attention
# sinks, as mlx-lm does: attention degrades badly once they slide out of the window
KEEP = 4


@dataclass(frozen=True)
class KVSettings:
    """How the KV cache is stored: full precision or `kv_bits`-bit groups, growing or bounded."""

    kv_bits: Optional[int] = None  # None: the compute dtype
    kv_group_size: int = 64
    max_kv_size: Optional[int] = None  # None: grows with the context

    def check(self, head_dim: Optional[int] = None) -> "KVSettings":
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise MistralError(f"kv_bits must be one of {KV_BITS} (or None for full precision), not {self.kv_bits}")
        if self.kv_group_size not in KV_GROUP_SIZES:
            raise MistralError(f"kv_group_size must be one of {KV_GROUP_SIZES}, not {self.kv_group_size}")
        if self.max_kv_size is not None and self.kv_bits is not None:
            # mlx-lm's RotatingKVCache has no quantized form
            raise MistralError("a rotating cache (max_kv_size) cannot be quantized (kv_bits): choose one")
        if self.kv_bits is not None and head_dim is not None and head_dim % self.kv_group_size:
            raise MistralError(f"kv_group_size {self.kv_group_size} does not divide the head dimension {head_dim}")
        if self.max_kv_size is not None and self.max_kv_size <= KEEP:
            raise MistralError(f"max_kv_size must be more than {KEEP} tokens, not {self.max_kv_size}")
        return self

    def describe(self) -> str:
        kind = "full-precision" if self.kv_bits is None else f"{self.kv_bits}-bit (group {self.kv_group_size})"
        bound = f", rotating at {self.max_kv_size} tokens" if self.max_kv_size else ""
        return f"{kind} KV{bound}"

    def as_metadata(self) -> dict[str, str]:
        return {"kv_bits": str(self.kv_bits or 0), "kv_group_size": str(self.kv_group_size),
                "max_kv_size": str(self.max_kv_size or 0)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "KVSettings":
        """The settings `as_metadata` wrote, checked: a missing or malformed value is a MistralError."""
        values = []
        for key in ("kv_bits", "kv_group_size", "max_kv_size"):
            text = meta.get(key)
            if not isinstance(text, str) or not text.isdigit():
                raise MistralError(f"{key} must be a whole number, not {text!r}")
            values.append(int(text))
        return cls(values[0] or None, values[1], values[2] or None).check()


def make_cache(model, *, kv_bits: Optional[int] = None, kv_group_size: int = 64,
               max_kv_size: Optional[int] = None) -> list:
    """One cache per layer: growing by default (the native decoder's kind where the model's
    backend is the native one), `kv_bits`-bit quantized, or a bounded rotating one holding the
    first `KEEP` and the last `max_kv_size - KEEP` tokens."""
    from .engine.backend import backend_for

    settings = KVSettings(kv_bits, kv_group_size, max_kv_size).check(model.args.head_dim)
    return backend_for(model).make_cache(settings)


def layer_caches(model, settings: KVSettings) -> list:
    """The MLX-ops kinds of `make_cache`: KVCache, QuantizedKVCache or RotatingKVCache."""
    if settings.max_kv_size is not None:
        return [RotatingKVCache(max_size=settings.max_kv_size, keep=KEEP) for _ in model.layers]
    if settings.kv_bits is not None:
        return [QuantizedKVCache(group_size=settings.kv_group_size, bits=settings.kv_bits) for _ in model.layers]
    return [KVCache() for _ in model.layers]


def portable(cache: list) -> list:
    """The caches as mlx-lm's own classes, which its prompt-cache files can name: the native
    decoder's growing cache becomes a plain KVCache over the same arrays."""
    from .kernels.cpu_model import NativeKVCache

    out = []
    for c in cache:
        if isinstance(c, NativeKVCache):
            plain = KVCache()
            plain.keys, plain.values, plain.offset = c.keys, c.values, c.offset
            c = plain
        out.append(c)
    return out


def adopt(model, cache: list) -> list:
    """Plain growing caches (from a file) in the kind the model's backend makes."""
    from .engine.backend import backend_for

    kind = type(backend_for(model).make_cache()[0])
    if kind is KVCache or not all(type(c) is KVCache for c in cache):
        return cache
    return [kind.like(c) for c in cache]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ConversationCache:
    """The KV of one token sequence (a conversation so far) and the ids it holds.

    For each request, `reuse(ids)` trims the cache to the longest common prefix with the new
    prompt ids and says how many are already computed; the caller feeds only the rest through
    the model and then `record`s the full sequence (prompt + generated ids). The prefix can
    shrink between turns: V7 moves `[AVAILABLE_TOOLS]` before the last user message, and a
    re-encoded assistant reply need not match the sampled ids.
    """

    def __init__(self, model, *, kv_bits: Optional[int] = None, kv_group_size: int = 64,
                 max_kv_size: Optional[int] = None, cache: Optional[list] = None,
                 tokens: Sequence[int] = ()):
        self.model = model
        self.settings = KVSettings(kv_bits, kv_group_size, max_kv_size).check(model.args.head_dim)
        self.cache = cache if cache is not None else self._fresh()
        self.tokens: list[int] = list(tokens)  # the ids whose K/V the cache holds, in order
        if len(self.tokens) != self.cache[0].offset:
            raise MistralError(f"the cache holds {self.cache[0].offset} tokens but {len(self.tokens)} ids were given")

    def _fresh(self) -> list:
        s = self.settings
        return make_cache(self.model, kv_bits=s.kv_bits, kv_group_size=s.kv_group_size, max_kv_size=s.max_kv_size)

    def __len__(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.cache = self._fresh()
        self.tokens = []

    def reuse(self, ids: Sequence[int]) -> int:
        """Trim to the longest common prefix with `ids` and return its length (`cached_tokens`).
        At least the last id is left to compute: its logits give the first new token."""
        n = min(common_prefix_length(self.tokens, ids), len(ids) - 1)
        drop = len(self.tokens) - n
        if drop:
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, drop)
            else:  # a rotating cache that has wrapped no longer holds the prefix in order
                self.reset()
                return 0
        self.tokens = self.tokens[:n]
        return n

    def record(self, sequence: Sequence[int]) -> None:
        """After a request: `sequence` is the prompt then the generated ids; the cache holds as
        many of them as its offset says (the last sampled id is usually not fed back)."""
        offsets = [c.offset for c in self.cache]
        held = min(offsets)
        if max(offsets) != held:  # interrupted inside a forward pass (Ctrl-C): keep what all layers hold
            if not can_trim_prompt_cache(self.cache):
                self.reset()
                return
            for c in self.cache:
                c.trim(c.offset - held)
        if held > len(sequence) or list(sequence[: len(self.tokens)]) != self.tokens:
            self.reset()
            return
        self.tokens = list(sequence[:held])

    def follow(self, ids: Sequence[int], steps: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        """Pass on generate_step's (token, logprobs) pairs for the prompt `ids`; however they
        end (finished, closed early, interrupted), `record` the prompt and the tokens seen."""
        generated: list[int] = []
        try:
            for token, logprobs in steps:
                generated.append(token)
                yield token, logprobs
        finally:
            steps.close()
            self.record(list(ids) + generated)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)
