"""What runs a model's forward: the native CPU decoder or MLX ops, one backend object per model.

The model (model.py) is only the math; which implementation runs it is decided here, once per
model and rebuilt when its weights change. Both backends take one sequence (`__call__`, prefill
and single-sequence decode) or a batch of sequences one token each (`decode`, the engine's
batched step): the native decoder runs the batch as the rows of one C call, the MLX path reads
the weights once for all rows and runs attention per sequence over its own cache ("ragged").
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import mlx.core as mx

from ..cache import KVSettings, layer_caches
from ..kernels import dispatch
from ..model import Model

NATIVE_ENV = "MLX_MISTRAL_NATIVE_DECODER"  # "0": never the native decoder in this process


def native_refusal(model) -> Optional[str]:
    """None when the native CPU decoder can run `model` here, else why it cannot."""
    if dispatch.backend() != "cpu":
        return f"MLX runs on {dispatch.backend()}, not its CPU backend"
    if os.environ.get(NATIVE_ENV) == "0":
        return f"{NATIVE_ENV}=0"
    if dispatch.cpu_kernels() is None:
        return "the native CPU kernels are not available"
    if not isinstance(model, Model):  # the decoder reads Model's own layout of weights
        return f"{type(model).__name__} is not an mlx-mistral Model"
    # A sharded model (model.group) runs here too, its all_sums called from the C decoder. Every
    # rank must choose alike (the C decoder's float32 sums would not pair with MLX ops' sums):
    # nothing above depends on the rank, given the same install and environment on every host.
    from ..kernels.cpu_model import NativeDecoder

    return NativeDecoder.supports(model)


def _switches() -> tuple:
    """The process-wide inputs of the choice (they may change between calls, e.g. in tests)."""
    return dispatch.backend(), os.environ.get(NATIVE_ENV)


def _weights(model) -> list:
    """Which arrays the model holds now: load_weights, set_dtype, quantize and fuse all replace
    them (a native decoder points into the old ones, so it must be rebuilt). A direct walk of
    the module tree: `model.parameters()` costs ~10x more on a 30-layer model."""
    out: list = []
    stack = [model]
    while stack:
        node = stack.pop()
        if isinstance(node, mx.array):
            out.append((id(node), node.dtype))
        elif isinstance(node, dict):  # nn.Module is a dict of its arrays, modules and lists
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return out


class Backend:
    """Runs one model: `name` is "native-cpu" (the C decoder, kernels/cpu_model.py) or "mlx"."""

    def __init__(self, model, native: Optional[bool] = None):
        self.model = model
        self.native = native  # what was asked: None (where it can run), True or False
        self._build()

    def _build(self) -> None:
        from ..kernels.cpu_model import NativeDecoder

        self.weights, self.switches = _weights(self.model), _switches()
        self.refusal = "turned off (native=False)" if self.native is False else native_refusal(self.model)
        if self.native is True and self.refusal is not None:
            raise ValueError(f"the native CPU decoder cannot run this model: {self.refusal}")
        self.decoder = NativeDecoder(self.model) if self.refusal is None else None
        self.name = "native-cpu" if self.decoder is not None else "mlx"

    def stale(self) -> bool:
        """Whether the model's weights, or the process's switches, changed since the build."""
        return self.switches != _switches() or self.weights != _weights(self.model)

    def sync(self) -> "Backend":
        """Rebuild if stale: a stale decoder would run the old weights (it pins them, so it never
        reads freed memory). Checked by `backend_for` and `make_cache`, once per request: the
        check walks every array of the model, too slow for every decode step."""
        if self.stale():
            self._build()
        return self

    def describe(self) -> str:
        if self.decoder is not None:
            return "native CPU decoder (one C call per step)"
        return "MLX ops" + (f" ({self.refusal})" if self.refusal and dispatch.backend() == "cpu" else "")

    def make_cache(self, settings: KVSettings = KVSettings()) -> list:
        """One sequence's per-layer caches: the native decoder's own kind where it runs and the
        settings are plain (full precision, growing), else `cache.layer_caches`'s kinds (plain
        ones from the model's own `make_cache`, as mlx-lm asks a model for them)."""
        if settings.kv_bits is not None or settings.max_kv_size is not None:
            return layer_caches(self.model, settings)
        if self.sync().decoder is not None:
            from ..kernels.cpu_model import NativeKVCache

            return [NativeKVCache() for _ in self.model.layers]
        return self.model.make_cache()

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        """One sequence: tokens (1, T) -> logits (1, T, vocab), appending T positions to cache."""
        decoder = self.decoder
        if decoder is not None and decoder.accepts(tokens, cache):
            return decoder(tokens, cache)
        return self.model(tokens, cache)

    def prefill(self, chunks: Sequence[tuple[Sequence[int], list]]) -> None:
        """Prompt chunks of several sequences, each (ids, that sequence's caches), appended to
        their caches with no logits. The native decoder runs them all as the rows of one call,
        reading the weights once (on the 2-core Xeon a 360-row call took ~3.7x a 45-row one, not
        8x); the MLX path runs them one by one."""
        decoder = self.decoder
        native = [(t, c) for t, c in chunks if decoder is not None and decoder.owns(c)]
        if native:
            decoder.rows(native)
        for tokens, cache in chunks:
            if decoder is None or not decoder.owns(cache):
                self.model(mx.array(tokens, dtype=mx.int32)[None], cache)
                mx.eval([c.state for c in cache])

    def prefill_and_decode(self, chunks: Sequence[tuple[Sequence[int], list]], tokens: Sequence[int],
                           caches: Sequence[list]) -> mx.array:
        """`prefill(chunks)` then `decode(tokens, caches)` (a sequence may be in both): on the
        native decoder one call, so a step that admits a prompt reads the weights once."""
        decoder = self.decoder
        if (decoder is not None and tokens and all(decoder.owns(c) for _, c in chunks)
                and all(decoder.owns(c) for c in caches) and len({id(c) for c in caches}) == len(caches)):
            return decoder.rows(chunks, tokens, caches)
        self.prefill(chunks)
        return self.decode(tokens, caches)

    def _ragged(self, ids: mx.array, caches: list) -> mx.array:
        """(B, 1) ids, one cache list each -> (B, vocab) on the MLX path; a model without a
        ragged forward (any mlx-lm-style `model(tokens, cache)`) runs its rows one by one."""
        ragged = getattr(self.model, "decode_ragged", None)
        if ragged is not None:
            return ragged(ids, caches)[:, 0]
        return mx.concatenate([self.model(ids[b : b + 1], caches[b])[:, -1] for b in range(ids.shape[0])])

    def decode(self, tokens: Sequence[int], caches: Sequence[list]) -> mx.array:
        """B sequences, one new token each: tokens[b] is sequence b's next input id, caches[b] its
        per-layer caches (any lengths). Returns logits (B, vocab); appends one position to each.
        Native caches go through one native call, the others through the MLX path."""
        if len(tokens) != len(caches):
            raise ValueError(f"{len(tokens)} tokens but {len(caches)} caches")
        if len({id(c) for c in caches}) != len(caches):  # two rows would write one position
            raise ValueError("a sequence's cache appears twice in one batch")
        tokens = [int(t) for t in tokens]
        if not tokens:
            return mx.zeros((0, self.model.args.vocab_size), mx.float32)
        decoder = self.decoder
        native = [b for b, c in enumerate(caches) if decoder is not None and decoder.owns(c)]
        rest = sorted(set(range(len(tokens))) - set(native))
        parts, order = [], []
        if native:
            parts.append(decoder.decode([tokens[b] for b in native], [caches[b] for b in native]))
            order += native
        if rest:
            ids = mx.array([[tokens[b]] for b in rest], dtype=mx.int32)  # (B', 1)
            parts.append(self._ragged(ids, [caches[b] for b in rest]))  # (B', vocab)
            order += rest
        if len(parts) == 1:
            return parts[0]
        inverse = sorted(range(len(order)), key=order.__getitem__)  # rows back into the callers' order
        return mx.concatenate(parts, axis=0)[mx.array(inverse)]


class _Slot:
    """A model's backends, one per `native` choice, kept on the model by this module (not a
    parameter: MLX keeps plain objects out of the parameter tree). A copy of the model (deepcopy,
    pickle) gets an empty slot, so it never runs a decoder pointing into the original's buffers."""

    def __init__(self):
        self.backends: dict[Optional[bool], Backend] = {}

    def __deepcopy__(self, memo) -> "_Slot":
        return _Slot()

    def __copy__(self) -> "_Slot":
        return _Slot()

    def __reduce__(self):
        return _Slot, ()


_SLOT = "_mlx_mistral_backends"


def backend_for(model, *, native: Optional[bool] = None) -> Backend:
    """The backend that runs `model`, one per model and `native` choice, rebuilt when the model's
    weights change. native=None: the native CPU decoder where it can run (MLX's CPU backend,
    formats its kernels cover, MLX_MISTRAL_NATIVE_DECODER != "0"); False: MLX ops; True: the
    native decoder or a ValueError saying why it cannot run."""
    slot = model.__dict__.get(_SLOT)
    if slot is None:
        slot = _Slot()
        setattr(model, _SLOT, slot)
    backends = slot.backends
    if native not in backends:
        backends[native] = Backend(model, native)
        return backends[native]
    return backends[native].sync()
