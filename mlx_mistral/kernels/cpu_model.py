"""The decoder stack in one native call per forward on MLX's CPU backend (cpu_model.h).

Why: on the CPU every MLX op costs 7-40 us of scheduling around its work, and every native
matmul called through ctypes is an eval boundary. A SmolLM2 decode step is ~450 ops and 121
such calls, ~45 ms, of which reading the weights is ~5 ms. Here the whole step is one C call:
embedding rows, per block RMSNorm, q/k/v, RoPE, the K/V cache write, attention, o, RMSNorm,
gate/up, SiLU-multiply, down, residuals, the final norm, and the head for up to
`HEAD_ROWS` tokens (wider calls get their logits as a lazy MLX graph, dequantize + BLAS, so
prefill chunks, whose logits nobody reads, never compute them).

The K/V cache stays mlx-lm's `KVCache` layout, as a subclass (`NativeKVCache`) whose float32
buffers the C code writes in place. Everything else keeps working on it unchanged: trimming
(speculation, conversation reuse), `state` for prompt-cache files, and MLX's own attention if
a forward ever takes the MLX path (which marks the buffers foreign, so the next native call
copies them into fresh ones of its own).

A batched decode step (`decode`) runs B sequences of one token each as the B rows of one call:
the weights are read once for all rows, each row's RoPE and K/V write use its own position, and
attention runs per (row, head) over that row's own cache.

The decoder is owned by the engine's backend (`engine/backend.py`), which builds it for a model,
rebuilds it when the model's weights change, and decides when it runs (CPU backend, supported
formats, MLX_MISTRAL_NATIVE_DECODER != "0").
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from . import cpu, dispatch

HEAD_ROWS = 16  # tokens per call whose logits the C call computes (decode, draft verification)
MAX_ROWS = 512  # tokens per C call: bounds its scratch (512 x 2F floats for gate/up)


class _Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("sc", ctypes.c_void_p), ("bi", ctypes.c_void_p), ("N", ctypes.c_int64),
                ("K", ctypes.c_int64), ("dt", ctypes.c_int), ("gs", ctypes.c_int), ("bits", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv", _Mat * 3),
                ("n_qkv", ctypes.c_int), ("o", _Mat), ("gu", _Mat * 2), ("n_gu", ctypes.c_int), ("down", _Mat)]


class _Model(ctypes.Structure):
    _fields_ = [("H", ctypes.c_int64), ("n_heads", ctypes.c_int64), ("n_kv", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("F", ctypes.c_int64), ("n_layers", ctypes.c_int64),
                ("eps", ctypes.c_float), ("rope_base", ctypes.c_float), ("scale", ctypes.c_float),
                ("layers", ctypes.c_void_p), ("final_norm", ctypes.c_void_p), ("head", _Mat),
                ("reduce", ctypes.c_void_p), ("reduce_ctx", ctypes.c_void_p)]  # reduce: a sharded model's all_sum


class NativeKVCache(KVCache):
    """mlx-lm's KVCache whose float32 buffers the native decoder owns and writes in place.

    `views` holds numpy views of the two buffers while they are ours; anything that replaces
    or updates them through MLX (the `keys`/`values` setters, `update_and_fetch`) drops them."""

    def __init__(self):
        self.views: Optional[tuple[np.ndarray, np.ndarray]] = None
        super().__init__()

    @property
    def keys(self):
        return self._keys

    @keys.setter
    def keys(self, value):
        self._keys, self.views = value, None

    @property
    def values(self):
        return self._values

    @values.setter
    def values(self, value):
        self._values, self.views = value, None

    def update_and_fetch(self, keys, values):
        self.views = None  # MLX rewrites the buffers (possibly into new memory)
        return super().update_and_fetch(keys, values)

    def reserve(self, n_kv: int, head_dim: int, need: int) -> tuple[np.ndarray, np.ndarray]:
        """Buffers of our own holding at least `need` positions, the first `offset` copied over."""
        if self.views is not None and self.views[0].shape[2] >= need:
            return self.views
        cap = -(-need // self.step) * self.step
        fresh = [np.zeros((1, n_kv, cap, head_dim), np.float32) for _ in range(2)]
        if self.offset:
            old = [a[..., : self.offset, :].astype(mx.float32) for a in (self._keys, self._values)]
            mx.eval(old)
            for dst, src in zip(fresh, old):
                dst[..., : self.offset, :] = np.asarray(src)
        arrays = [mx.array(a) for a in fresh]  # MLX's own contiguous copies; we write into them
        mx.eval(arrays)
        views = tuple(np.asarray(a) for a in arrays)
        if any(v.base is None or not v.flags.c_contiguous for v in views):
            raise RuntimeError("MLX did not expose the K/V buffers in place")
        self._keys, self._values = arrays
        self.views = views
        return views

    @classmethod
    def like(cls, cache: KVCache) -> "NativeKVCache":
        """The same keys, values and offset in a NativeKVCache."""
        out = cls()
        out.keys, out.values, out.offset = cache.keys, cache.values, cache.offset
        return out


def _quantized(module) -> bool:
    return (module is not None and "scales" in module and "biases" in module and "bias" not in module
            and getattr(module, "mode", "affine") == "affine"
            and cpu.supports(getattr(module, "group_size", 0), getattr(module, "bits", 0))
            and module["scales"].dtype in cpu.DTYPE_CODES)


def _norm(module: nn.Module) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(module.weight.astype(mx.float32)), dtype=np.float32)


class NativeDecoder:
    """The model's weights as C structs (pointers into MLX's buffers, held alive here).

    A rank of a sharded model (`model.group` set) runs its slice: the shapes are the slice's
    (`model.local_args`), the row-parallel projections' partial products are summed across the
    ranks from inside the C call, and the embedding and the head are joined around it
    (distributed/native.py)."""

    def __init__(self, model):
        args = model.local_args  # this process's shapes (a slice of the model when sharded)
        self.args = args
        self.vocab = model.args.vocab_size  # the whole model's: what a logits row holds
        self.shard = None
        if model.group is not None:
            from ..distributed.native import NativeCollectives

            self.shard = NativeCollectives(model)
        self.packs: list = []  # keep every Packed (its numpy views pin the MLX buffers)
        self.norms: list[np.ndarray] = []
        layers = (_Layer * len(model.layers))()
        for i, block in enumerate(model.layers):
            attn, mlp = block.self_attn, block.mlp
            qkv = [attn.qkv_proj.linear] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
            gu = [mlp.gate_up_proj.linear] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
            L = layers[i]
            L.attn_norm = self._norm_ptr(block.input_layernorm)
            L.mlp_norm = self._norm_ptr(block.post_attention_layernorm)
            for j, m in enumerate(qkv):
                L.qkv[j] = self._mat(m)
            L.n_qkv = len(qkv)
            L.o = self._mat(self._local(attn.o_proj))
            for j, m in enumerate(gu):
                L.gu[j] = self._mat(m)
            L.n_gu = len(gu)
            L.down = self._mat(self._local(mlp.down_proj))
        self.layers = layers
        embed = model.model.embed_tokens
        if self.shard is not None:  # shard.VocabEmbedding / VocabHead around this rank's rows
            head, embed = model.lm_head.linear, embed.embed
        else:
            head = embed if args.tie_word_embeddings else model.lm_head
        self.embed = self._mat(embed) if _quantized(embed) else None
        md = _Model(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                    args.intermediate_size, len(model.layers), args.rms_norm_eps, args.rope_theta,
                    args.head_dim**-0.5, ctypes.cast(layers, ctypes.c_void_p), self._norm_ptr(model.model.norm))
        if _quantized(head):
            md.head = self._mat(head)
        if self.shard is not None:
            md.reduce = ctypes.cast(self.shard.reduce, ctypes.c_void_p)
        self.has_head = _quantized(head)
        self.head = head
        self.md = md
        self.model = model
        self.n_layers = len(model.layers)
        self.lib = cpu._library()[0]
        self.lib.mm_model_rows.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                           ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        self.lib.mm_embed.argtypes = [ctypes.POINTER(_Mat), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]

    @staticmethod
    def supports(model) -> Optional[str]:
        """None if the decoder can run this model, else why not."""
        if not cpu.available():
            return cpu._library()[1]
        args = model.local_args
        if args.num_attention_heads % args.num_key_value_heads or args.head_dim % 2:
            return "head layout"
        local = (lambda m: m.linear) if model.group is not None else (lambda m: m)  # shard.SumAcross
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            mats = ([attn.qkv_proj.linear] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj])
            mats += [local(attn.o_proj), local(mlp.down_proj)]
            mats += [mlp.gate_up_proj.linear] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
            if not all(_quantized(m) for m in mats):
                return "a projection is not affine 4/8-bit with group 32/64/128"
        return None

    def _local(self, module):
        """A row-parallel projection's own matrix: a sharded model wraps it in its all_sum
        (shard.SumAcross), which the C call makes itself."""
        return module.linear if self.shard is not None else module

    def _norm_ptr(self, module) -> int:
        w = _norm(module)
        self.norms.append(w)
        return w.ctypes.data

    def _mat(self, module) -> _Mat:
        p = cpu.Packed(module["weight"], module["scales"], module["biases"], module.group_size, module.bits)
        self.packs.append(p)
        return _Mat(p.w, p.scales, p.biases, p.N, p.K, p.dtype, p.group_size, p.bits)

    @staticmethod
    def owns(cache: Optional[list]) -> bool:
        """Whether `cache` (one sequence's per-layer caches) is the decoder's own kind."""
        return cache is None or all(type(c) is NativeKVCache for c in cache)

    @staticmethod
    def accepts(tokens: mx.array, cache: Optional[list]) -> bool:
        return tokens.ndim == 2 and tokens.shape[0] == 1 and tokens.shape[1] > 0 and NativeDecoder.owns(cache)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        if self.shard is not None and self.embed is not None:  # C looks up this rank's rows
            return self.shard.embed(ids, self._rows)
        x = np.empty((ids.size, self.args.hidden_size), np.float32)
        if self.embed is None:  # a sharded model's VocabEmbedding sums across the ranks itself
            x[:] = np.asarray(self.model.model.embed_tokens(mx.array(ids)).astype(mx.float32))
            return x
        return self._rows(ids)

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of the (local) quantized embedding, float32 (M, hidden)."""
        x = np.empty((ids.size, self.args.hidden_size), np.float32)
        if self.lib.mm_embed(ctypes.byref(self.embed), np.ascontiguousarray(ids, np.int32).ctypes.data, ids.size,
                             x.ctypes.data) != 0:
            raise ValueError(f"token id out of range 0..{self.vocab - 1}")
        return x

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        """logits (1, T, vocab) of `tokens` (1, T), appending their K/V to `cache`."""
        cache = cache if cache is not None else [NativeKVCache() for _ in range(self.n_layers)]
        ids = np.asarray(tokens).reshape(-1)
        want = ids.size <= HEAD_ROWS and self.has_head  # wider calls: a lazy head nobody may read
        x, logits = self._forward([(ids, cache)], ids.size if want else 0)
        if want:
            return logits[None]
        return self._lazy_head(mx.array(x)[None])

    def decode(self, ids: Sequence[int], caches: Sequence[list]) -> mx.array:
        """logits (B, vocab): row b is sequence b's next-token logits after its input `ids[b]`,
        whose K/V is appended to `caches[b]` (sequences may hold different lengths)."""
        if len(caches) != len(ids):
            raise ValueError(f"{len(ids)} tokens but {len(caches)} caches")
        if not len(ids):
            return mx.zeros((0, self.vocab), mx.float32)
        return self.rows((), ids, caches)

    def rows(self, chunks: Sequence[tuple[Sequence[int], list]], ids: Sequence[int] = (),
             caches: Sequence[list] = ()) -> Optional[mx.array]:
        """Several sequences in one pass over the weights: each `chunks[i]` = (ids, caches) is a
        prefill chunk appended to that sequence's caches (no logits); then `ids[b]` is fed to
        `caches[b]` (after its chunk when a sequence has both). Returns the logits (B, vocab) of
        the `ids` rows, or None when there are none."""
        B = len(ids)
        x, logits = self._forward([*chunks, *zip([[int(i)] for i in ids], caches)], B if self.has_head else 0)
        if not B:
            return None
        if logits is not None:
            return logits
        return self._lazy_head(mx.array(x[-B:])[None])[0]

    def _forward(self, segments: Sequence[tuple[Sequence[int], list]], n_out: int):
        """The rows of every segment (ids, that sequence's caches), in order, through one C call
        per MAX_ROWS rows; a sequence's later segments continue its earlier ones. Returns the
        final-normed hidden states (M, hidden) and the C head's logits of the last `n_out` rows
        as an MLX array, gathered across the ranks of a sharded model (None when n_out is 0)."""
        args = self.args
        order: dict[int, int] = {}  # id(cache list) -> its sequence index in the call
        seqs: list[list] = []
        feed, seq_of = [], []
        for tokens, cache in segments:
            s = order.setdefault(id(cache), len(seqs))
            if s == len(seqs):
                seqs.append(cache)
            feed += list(tokens)
            seq_of += [s] * len(tokens)
        M, D0 = len(feed), len(feed) - n_out  # rows D0.. are the ones whose logits are wanted
        if M == 0:
            return np.empty((0, args.hidden_size), np.float32), None
        seq = np.asarray(seq_of, np.int64)
        start = np.empty(len(seqs), np.int64)
        for s, cache in enumerate(seqs):
            start[s] = cache[0].offset
            if any(c.offset != start[s] for c in cache):
                raise ValueError("the layers' caches hold different numbers of tokens")
        pos = np.empty(M, np.int64)
        seen = np.zeros(len(seqs), np.int64)
        for m, s in enumerate(seq_of):
            pos[m] = start[s] + seen[s]
            seen[s] += 1
        views = []
        for s, cache in enumerate(seqs):
            views += [c.reserve(args.num_key_value_heads, args.head_dim, int(start[s] + seen[s])) for c in cache]
        kp = (ctypes.c_void_p * len(views))(*[v[0].ctypes.data for v in views])  # (sequences, n_layers)
        vp = (ctypes.c_void_p * len(views))(*[v[1].ctypes.data for v in views])
        caps = (ctypes.c_int64 * len(views))(*[v[0].shape[2] for v in views])
        x = self._embed(np.ascontiguousarray(feed, dtype=np.int32))
        logits = np.empty((n_out, args.vocab_size), np.float32) if n_out else None
        for a in range(0, M, MAX_ROWS):  # bounds the call's scratch; later windows see earlier K/V
            b = min(a + MAX_ROWS, M)
            first = max(D0 - a, 0)  # the window's first row with logits (b - a: none)
            out = logits[a + first - D0:].ctypes.data if n_out and first < b - a else None
            rc = self.lib.mm_model_rows(ctypes.byref(self.md), x[a:].ctypes.data, b - a, pos[a:].ctypes.data,
                                        seq[a:].ctypes.data, len(seqs), kp, vp, caps, first, out)
            if rc == -2:
                raise self.shard.failure()
            if rc != 0:
                raise ValueError("the native decoder does not support this model's format")
        for s, cache in enumerate(seqs):
            for c in cache:
                c.offset += int(seen[s])
        if logits is None:
            return x, None
        return x, self.shard.gather(logits) if self.shard is not None else mx.array(logits)

    def _lazy_head(self, h: mx.array) -> mx.array:
        """Logits of many rows as a lazy MLX graph: a prefill chunk's are never evaluated. A
        sharded model's head gathers its slices when they are (every rank reads the same)."""
        if self.has_head and self.shard is None:
            head = self.head
            return dispatch.dequantized_matmul(h, head["weight"], head["scales"], head["biases"],
                                               group_size=head.group_size, bits=head.bits)
        return self.model.head(h)
