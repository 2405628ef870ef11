"""The Mistral Small 3 transformer (also runs Llama-architecture checkpoints: same block math).

Parameter names follow the HF checkpoints (`model.layers.N.self_attn.q_proj.weight` …), so an HF
folder, an mlx-lm folder and our converted folder all load without renaming.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

from .config import ModelArgs
from .kernels import dispatch
from .kernels.layers import FusedGateUp, FusedLinear, concat_linears, dispatched


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim  # 128 for Mistral Small 3, not hidden / heads (160)
        self.scale = self.head_dim**-0.5
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.qkv_proj = None  # set by fuse(): q, k and v rows as one matrix
        # HF checkpoints store q/k rows for half-split ("non-traditional") RoPE
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self._qkv(x)
        out = self._attend(q, k, v, mask, cache)  # (B, n_heads, L, hd)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # o of (B, L, n_heads * hd)

    def ragged(self, x: mx.array, caches: list) -> mx.array:
        """B sequences of one token each, each over its own cache (its own length): the
        projections read the weights once for all rows, attention runs per sequence."""
        B = x.shape[0]  # x: (B, 1, hidden)
        q, k, v = self._qkv(x)  # (B, heads, 1, hd)
        outs = [self._attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], None, c) for b, c in enumerate(caches)]
        out = mx.concatenate(outs, axis=0)  # (B, n_heads, 1, hd)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, 1, -1))

    def _qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        B, L, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, n_heads, L, hd)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, n_kv, L, hd)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, n_kv, L, hd)
        return q, k, v

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Any, cache: Optional[Any]) -> mx.array:
        """RoPE at the cache's offset, the cache append, then attention: (B, n_heads, L, hd)."""
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, n_kv, offset + L, hd)
        # GQA: sdpa broadcasts each KV head over its n_heads / n_kv_heads query heads
        return scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)

    def fuse(self) -> None:
        """q/k/v into one matrix when they share a format; quantized layers to the dispatcher."""
        if self.qkv_proj is not None:
            return
        qkv = concat_linears([self.q_proj, self.k_proj, self.v_proj])
        if qkv is not None:
            kv = self.n_kv_heads * self.head_dim
            self.qkv_proj = FusedLinear(qkv, (self.n_heads * self.head_dim, kv, kv))
            del self.q_proj, self.k_proj, self.v_proj
        else:
            self.q_proj, self.k_proj, self.v_proj = map(dispatched, (self.q_proj, self.k_proj, self.v_proj))
        self.o_proj = dispatched(self.o_proj)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.gate_up_proj = None  # set by fuse(): gate rows then up rows, SwiGLU epilogue

    def __call__(self, x: mx.array) -> mx.array:
        if self.gate_up_proj is not None:
            return self.down_proj(self.gate_up_proj(x))
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU

    def fuse(self) -> None:
        """gate/up into one matrix when they share a format; quantized layers to the dispatcher."""
        if self.gate_up_proj is not None:
            return
        gate_up = concat_linears([self.gate_proj, self.up_proj])
        if gate_up is not None:
            self.gate_up_proj = FusedGateUp(gate_up)
            del self.gate_proj, self.up_proj
        else:
            self.gate_proj, self.up_proj = dispatched(self.gate_proj), dispatched(self.up_proj)
        self.down_proj = dispatched(self.down_proj)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def ragged(self, x: mx.array, caches: list) -> mx.array:
        h = x + self.self_attn.ragged(self.input_layernorm(x), caches)
        return h + self.mlp(self.post_attention_layernorm(h))


def embedding_rows(embed: nn.Module, tokens: mx.array, dtype: mx.Dtype) -> mx.array:
    """Embedding rows in the compute dtype `dtype`. Quantized rows are dequantized with their
    scales in that dtype: the scales stay stored in 16 bits, and dequantizing in 16 bits would
    round every row of the residual stream (~0.4% on the tiny preset)."""
    if not isinstance(embed, nn.QuantizedEmbedding):
        return embed(tokens)
    return mx.dequantize(embed["weight"][tokens], embed["scales"][tokens].astype(dtype),
                         embed["biases"][tokens].astype(dtype), group_size=embed.group_size, bits=embed.bits)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def embed(self, tokens: mx.array) -> mx.array:
        return embedding_rows(self.embed_tokens, tokens, self.norm.weight.dtype)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        h = self.embed(tokens)  # (B, T, hidden)
        if cache is None:
            cache = [None] * len(self.layers)
        # "causal" (or None for one token); sdpa aligns it to the cache offset
        mask = create_attention_mask(h, cache[0])
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        return self.norm(h)

    def ragged(self, tokens: mx.array, caches: list[list]) -> mx.array:
        """tokens (B, 1), caches[b] sequence b's per-layer caches -> (B, 1, hidden)."""
        h = self.embed(tokens)  # (B, 1, hidden)
        for i, layer in enumerate(self.layers):
            h = layer.ragged(h, [c[i] for c in caches])
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # the shapes this process holds: a rank of a sharded model keeps its slice's here while
        # `args` becomes the whole model's (distributed/shard.py `wire`)
        self.local_args = args
        self.model_type = args.model_type
        self.model = Transformer(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.group = None  # the mx.distributed group of a sharded model (distributed/shard.py)

    @classmethod
    def from_config(cls, args: ModelArgs) -> "Model":
        """A model with random weights (MLX's default initialisation)."""
        return cls(args)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        return self.head(self.model(tokens, cache))  # (B, T, vocab)

    def decode_ragged(self, tokens: mx.array, caches: list[list]) -> mx.array:
        """B sequences of different lengths, one new token each: tokens (B, 1), caches[b]
        sequence b's per-layer caches -> logits (B, 1, vocab); one position appended to each."""
        return self.head(self.model.ragged(tokens, caches))

    def head(self, h: mx.array) -> mx.array:
        """The output head: (B, T, hidden) -> (B, T, vocab); quantized through the dispatcher."""
        if not self.args.tie_word_embeddings:
            return self.lm_head(h)
        embed = self.model.embed_tokens
        if isinstance(embed, nn.QuantizedEmbedding):
            return dispatch.quantized_matmul(h, embed["weight"], embed["scales"], embed.get("biases"),
                                             group_size=embed.group_size, bits=embed.bits,
                                             mode=getattr(embed, "mode", "affine"))
        return embed.as_linear(h)

    @property
    def layers(self) -> list:
        return self.model.layers

    def fuse(self) -> "Model":
        """Fuse q/k/v and gate/up per layer and route quantized matmuls through the kernel
        dispatcher. Run after the weights load (they load under their HF names)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        if not self.args.tie_word_embeddings:
            self.lm_head = dispatched(self.lm_head)
        return self

    def make_cache(self) -> list:
        """Growing K/V caches for the MLX-ops forward (mlx-lm calls this when present); the
        engine's backend makes the native decoder's kind (`engine.backend.Backend.make_cache`)."""
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict) -> dict:
        """Drop tensors HF checkpoints carry that the model does not use."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
