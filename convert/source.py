"""A checkpoint folder in either released layout, seen as HF-named tensors in HF row order.

- HF: `config.json` + `model-*.safetensors` with `model.safetensors.index.json` (or one
  `model.safetensors`).
- Mistral consolidated: `params.json` + `consolidated.safetensors` + `tekken.json`; its names
  are mapped by `CONSOLIDATED_TO_HF` and its wq/wk rows permuted from interleaved RoPE order to
  HF's half-split order.
Every tensor is checked against the shapes the config implies before anything is read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..config import ModelArgs, tensor_shapes
from ..errors import MistralError
from .safetensors_read import TensorRef, read_header

# Mistral's consolidated names -> HF names ({i} is the layer index). w1/w3/w2 = gate/up/down.
CONSOLIDATED_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst)
             for src, dst in CONSOLIDATED_TO_HF.items()]
# HF tensors that are not parameters of the model (older exports carry RoPE's inverse frequencies)
IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")
# tokenizer and generation files a converted folder carries over, when the source has them
TOKENIZER_FILES = ["tekken.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "generation_config.json"]


def consolidated_to_hf(name: str) -> Optional[str]:
    for pattern, dst in _PATTERNS:
        m = pattern.match(name)
        if m:
            return dst.replace("{i}", m.group(1)) if m.groups() else dst
    return None


def to_half_split(w: mx.array, head_dim: int) -> mx.array:
    """Rows of whole heads from interleaved-RoPE order (consolidated) to half-split order (HF)."""
    cols = w.shape[-1]
    w = w.reshape(-1, head_dim // 2, 2, cols)  # (heads, hd/2, 2, dim)
    return w.transpose(0, 2, 1, 3).reshape(-1, cols)  # (heads * hd, dim)


def to_interleaved(w: mx.array, head_dim: int) -> mx.array:
    """The inverse of `to_half_split`: HF q/k rows back to the consolidated order."""
    cols = w.shape[-1]
    w = w.reshape(-1, 2, head_dim // 2, cols)  # (heads, 2, hd/2, dim)
    return w.transpose(0, 2, 1, 3).reshape(-1, cols)  # (heads * hd, dim)


@dataclass(frozen=True)
class SourceTensor:
    name: str  # HF name
    ref: TensorRef
    rope_head_dim: Optional[int] = None  # set for consolidated wq/wk: rows need to_half_split

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ref.shape

    def read_rows(self, start: int, stop: int) -> mx.array:
        """Rows [start, stop) in HF order; q/k blocks must hold whole heads."""
        w = self.ref.read_rows(start, stop)
        return to_half_split(w, self.rope_head_dim) if self.rope_head_dim else w


@dataclass
class Source:
    folder: Path
    layout: str  # "hf" or "consolidated"
    args: ModelArgs
    config: dict  # the HF config.json the output carries (before quantization keys)
    tensors: list[SourceTensor]  # in model order (embedding, layers, norm, head)
    tokenizer_files: list[Path]

    @property
    def nbytes(self) -> int:
        return sum(t.ref.nbytes for t in self.tensors)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MistralError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise MistralError(f"cannot read {path}: expected a JSON object")
    return data


def _hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MistralError(f"cannot read {index}: no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise MistralError(f"{folder} is missing weight shard {name} (listed in {index.name})")
        return [folder / f for f in files]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise MistralError(f"{folder} has no model*.safetensors weights")
    return files


def _collect(files: list[Path]) -> dict[str, TensorRef]:
    refs: dict[str, TensorRef] = {}
    for f in files:
        for name, ref in read_header(f).items():
            if name in refs:
                raise MistralError(f"tensor {name} appears in both {refs[name].file.name} and {f.name}")
            refs[name] = ref
    return refs


def _match(found: dict[str, SourceTensor], args: ModelArgs, config_name: str, src_names: dict) -> list[SourceTensor]:
    """Order `found` like the model and fail on anything missing, unexpected or misshapen."""
    expected = dict(tensor_shapes(args))
    for name, t in found.items():
        if name not in expected:
            raise MistralError(f"unexpected tensor {src_names[name]} in {t.ref.file.name} "
                               f"(not a parameter of a {args.num_hidden_layers}-layer Mistral model)")
    for name, shape in expected.items():
        if name in found and found[name].shape != shape:
            raise MistralError(f"tensor {src_names[name]} has shape {found[name].shape} but {config_name} "
                               f"implies {shape}")
    missing = [n for n in expected if n not in found]
    if missing:
        raise MistralError(f"the checkpoint lacks tensor {missing[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [found[n] for n in expected]


def _open_hf(folder: Path) -> Source:
    config = _read_json(folder / "config.json")
    args = ModelArgs.from_dict(config, source=str(folder / "config.json"))
    if "quantization" in config:
        raise MistralError(f"{folder} is already quantized (an MLX model folder); nothing to convert")
    found, names = {}, {}
    for name, ref in _collect(_hf_weight_files(folder)).items():
        if IGNORED.search(name) or (name == "lm_head.weight" and args.tie_word_embeddings):
            continue
        found[name], names[name] = SourceTensor(name, ref), name
    return Source(folder, "hf", args, config, _match(found, args, "config.json", names), [])


def _open_consolidated(folder: Path, files: list[Path]) -> Source:
    args = ModelArgs.from_params(_read_json(folder / "params.json"), source=str(folder / "params.json"))
    found, names = {}, {}
    for src_name, ref in _collect(files).items():
        name = consolidated_to_hf(src_name)
        if name is None:
            raise MistralError(f"unexpected tensor {src_name} in {ref.file.name} (not in the consolidated name map)")
        rope = args.head_dim if name.endswith(("q_proj.weight", "k_proj.weight")) else None
        found[name], names[name] = SourceTensor(name, ref, rope), src_name
    config = args.to_hf_dict()
    config.update(sliding_window=None)
    return Source(folder, "consolidated", args, config, _match(found, args, "params.json", names), [])


def open_source(folder: str | Path) -> Source:
    """Detect the layout of `folder` and check every tensor header against its config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MistralError(f"no such checkpoint folder: {folder}")
    consolidated = sorted(folder.glob("consolidated*.safetensors"))
    if (folder / "params.json").exists() and consolidated:
        source = _open_consolidated(folder, consolidated)
    elif (folder / "config.json").exists():
        source = _open_hf(folder)
    else:
        raise MistralError(f"{folder} holds neither an HF checkpoint (config.json) nor a consolidated "
                           "one (params.json + consolidated.safetensors)")
    source.tokenizer_files = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
    names = {f.name for f in source.tokenizer_files}
    if not names & {"tekken.json", "tokenizer.json", "tokenizer_config.json"}:
        raise MistralError(f"{folder} has no tokenizer (tekken.json or tokenizer.json)")
    if "tekken.json" in names:  # a mismatched one would only fail at generation, deep in the model
        from ..tokenizer import Tokenizer, check_tokenizer

        check_tokenizer(Tokenizer.from_file(folder / "tekken.json"), source.args.vocab_size, folder)
    return source
