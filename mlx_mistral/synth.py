"""Random-weight checkpoints of the Mistral Small 3 shape, full size or scaled down.

They let every stage run without the real weights: an HF-format folder (config.json, sharded
safetensors with HF tensor names, tekken.json) that transformers, mlx-lm and mlx-mistral load.
Tensors are generated (and optionally quantized) one at a time, so the full 24B shape never
needs its 47 GB in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .config import ModelArgs, tensor_shapes  # noqa: F401  (tensor_shapes: re-exported for the CLI)
from .convert.writer import ShardWriter, atomic_output_dir, write_config
from .errors import MistralError

REAL = dict(  # Mistral-Small-24B-Instruct-2501's config.json
    hidden_size=5120, num_hidden_layers=40, intermediate_size=32768, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=131072, rope_theta=1e8, rms_norm_eps=1e-5,
    max_position_embeddings=32768, tie_word_embeddings=False,
)

PRESETS = {
    # a few MB; keeps the real quirks: head_dim != hidden/heads, 4:1 GQA, theta 1e8, untied head;
    # head_dim 64 so every KV group size up to 64 fits (--kv-bits works on it)
    "tiny": dict(REAL, hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=8192),
    # ~240M parameters, real head_dim: big enough for meaningful CPU timings
    "small": dict(REAL, hidden_size=1280, num_hidden_layers=8, intermediate_size=4096,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=32768),
    "mistral-small-3": REAL,
}

INIT_STD = 0.02  # keeps activations bounded through the residual stream at any depth


def tekken_json(vocab_size: int) -> dict:
    """mistral-common's Tekken file set to V7 (Mistral Small 3's chat format), its vocabulary
    cut to `vocab_size` ids (the first 1000 are the special tokens)."""
    import mistral_common

    data = json.loads((Path(mistral_common.__file__).parent / "data" / "tekken_240911.json").read_text())
    data["config"]["version"] = "v7"
    data["config"]["default_vocab_size"] = vocab_size
    return data


def synth(
    out: str | Path,
    preset: str = "tiny",
    *,
    bits: Optional[int] = None,
    group_size: int = 64,
    seed: int = 0,
    force: bool = False,
    progress: Optional[Callable[[str, int], None]] = None,
) -> Path:
    """Write a random-weight checkpoint; quantized (mlx-lm folder format) when `bits` is set."""
    if preset not in PRESETS:
        raise MistralError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    args = ModelArgs.from_dict(dict(PRESETS[preset], model_type="mistral"))
    if bits is not None:
        args.quantization = {"group_size": group_size, "bits": bits}
    key = mx.random.key(seed)  # tensor n uses the (n+1)-th split, so shards are reproducible
    with atomic_output_dir(out, force) as tmp:
        writer = ShardWriter(tmp, metadata_format="mlx" if bits else "pt")
        for n, (name, shape) in enumerate(tensor_shapes(args)):
            if len(shape) == 1:
                tensor = mx.ones(shape, dtype=mx.bfloat16)
                writer.add(name, tensor)
            else:
                w = mx.random.normal(shape, key=mx.random.split(key, n + 2)[n + 1]) * INIT_STD
                if bits is None:
                    writer.add(name, w.astype(mx.bfloat16))
                else:
                    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
                    base = name.removesuffix(".weight")
                    writer.add(f"{base}.weight", wq)
                    writer.add(f"{base}.scales", scales.astype(mx.bfloat16))
                    writer.add(f"{base}.biases", biases.astype(mx.bfloat16))
            mx.eval(list(writer.pending.values()))
            if progress:
                progress(name, int(mx.prod(mx.array(shape)).item()))
        writer.close()
        config = args.to_hf_dict()
        config.update(sliding_window=None, torch_dtype="bfloat16", hidden_act="silu")
        write_config(tmp, config)
        (tmp / "tekken.json").write_text(json.dumps(tekken_json(args.vocab_size)))
    return Path(out)
