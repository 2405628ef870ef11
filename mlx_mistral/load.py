"""Model folder (or hub id) -> (Model, Tokenizer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .config import ModelArgs
from .kernels.dispatch import compute_dtype
from .errors import MistralError, first_line
from .model import Model
from .tokenizer import check_tokenizer, load_tokenizer

# What a hub download fetches: an MLX/HF folder's config, weights and tokenizer, nothing else.
HUB_PATTERNS = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tekken.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def runtime_summary(model=None, kv_bits: Optional[int] = None, max_kv_size: Optional[int] = None) -> str:
    """Where the numbers come from, for --verbose (with `model`: which forward path it takes)."""
    from . import _blas
    from .engine.backend import backend_for
    from .kernels import dispatch

    dtype = compute_dtype()
    text = (f"device: {mx.default_device()}, compute dtype: {'checkpoint' if dtype is None else dtype}, "
            f"BLAS: {_blas.describe()}, kernels: {dispatch.describe()}")
    if model is not None and dispatch.backend() == "cpu":
        runner = backend_for(model)
        if runner.decoder is None:
            text += f", forward: {runner.describe()}"
        elif kv_bits or max_kv_size:
            text += ", forward: MLX ops (the native decoder keeps a plain KV cache: no --kv-bits/--max-kv-size)"
        else:
            text += ", forward: native CPU decoder (one C call per step)"
    return text


def resolve(path_or_hub_id: str | Path) -> Path:
    """A local folder as is. A hub id of an MLX folder is downloaded (with progress) into the HF
    cache; any other hub checkpoint (the default model's is one) is downloaded and converted to
    4-bit once, into mlx-mistral's cache, and reused from there."""
    from .convert import hub

    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MistralError(f"{path} is a file; expected a model folder")
        return path
    if not hub.HUB_ID.match(str(path_or_hub_id)):
        raise MistralError(f"no such model folder: {path}")
    repo = str(path_or_hub_id)
    converted = hub.converted_path(repo)
    if (converted / "config.json").exists():
        return converted
    try:
        files, tags = hub.repo_info(repo)
    except MistralError:
        cached = hub.cached_snapshot(repo, HUB_PATTERNS)  # offline: an MLX folder downloaded before
        if cached is None or not (cached / "config.json").exists():
            raise
        return cached
    if "mlx" in tags or _is_mlx_config(repo, files):
        return hub.download(repo, HUB_PATTERNS)
    from .convert.pipeline import RichProgress, convert

    print(f"mlx-mistral: converting {repo} to MLX 4-bit once, into {converted}", file=sys.stderr)
    with RichProgress(f"converting {repo}") as progress:
        convert(repo, converted, bits=4, group_size=64, progress=progress)
    return converted


def _is_mlx_config(repo: str, files: list[str]) -> bool:
    """Whether the repo's config.json says it is already quantized for MLX."""
    if "config.json" not in files:
        return False
    from .convert import hub

    return "quantization" in read_config(hub.download(repo, ["config.json"]))


def read_config(folder: Path) -> dict:
    """A folder's config.json, checked field by field (`ModelArgs.from_dict`) before anything
    is sized from it: a bad value is one MistralError naming the file and the field."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise MistralError(f"{folder} has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MistralError(f"cannot read {path}: {first_line(e)}") from e
    ModelArgs.from_dict(config, source=str(path))
    return config


def config_only(path_or_hub_id: str | Path) -> tuple[dict, Optional[int]]:
    """A model's config.json without its weights (one small download for a hub id), and the
    bytes of its weight files where they are at hand."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return read_config(path), sum(f.stat().st_size for f in path.glob("model*.safetensors")) or None
    from .convert import hub

    if path.exists() or not hub.HUB_ID.match(str(path_or_hub_id)):
        resolve(path_or_hub_id)  # raises the right error
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return read_config(Path(hf_hub_download(str(path_or_hub_id), "config.json")).parent), None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise MistralError(f"cannot download the config of {path_or_hub_id}: {first_line(e)}") from e


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise MistralError(f"{folder} has no model*.safetensors weights")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise MistralError(f"cannot read {index}: {e}") from e
        missing = sorted(names - {f.name for f in files})
        if missing:
            raise MistralError(f"{folder} is missing weight shard {missing[0]}")
    return files


def load_weights(folder: Path) -> dict[str, mx.array]:
    weights = {}
    for f in weight_files(folder):
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as e:
            raise MistralError(f"cannot read {f}: {first_line(e)}") from e
    return weights


def quantize_like_folder(model: Model, quantization: dict, weights: dict) -> None:
    """Turn the Linear/Embedding layers the folder stores quantized into quantized layers,
    honouring mlx-lm's per-layer overrides (`"model.layers.0.mlp.down_proj": {"bits": 8, ...}`
    or `false`)."""

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Floating parameters to `dtype`, except quantization scales and biases: every kernel reads
    them in their stored 16-bit dtype (bf16 scales are exact), and a float32 copy would cost the
    24B shape 1.3 GB of memory and ~9% more bytes per token. Packed weights stay uint32."""
    def cast(path: str, v: mx.array) -> mx.array:
        if path.endswith((".scales", ".biases")) or not mx.issubdtype(v.dtype, mx.floating):
            return v
        return v.astype(dtype)

    model.update(tree_map_with_path(cast, model.parameters()))


def fill(model: Model, folder: Path, args: ModelArgs, weights: dict, dtype: Optional[mx.Dtype]) -> None:
    """Put `weights` into `model` (quantized as the folder says) and cast it to the compute
    dtype. The caller keeps no reference to `weights`: fusing replaces them afterwards."""
    if args.quantization:
        quantize_like_folder(model, args.quantization, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MistralError(f"weights in {folder} do not match config.json: {first_line(e)}") from e
    dtype = dtype or compute_dtype()
    if dtype is not None:
        cast_floats(model, dtype)


def load_model(path: str | Path, *, dtype: Optional[mx.Dtype] = None, lazy: bool = False,
               fuse: bool = True) -> Model:
    """The model of a local folder. `dtype` overrides the compute dtype policy; `fuse=False`
    keeps q/k/v and gate/up as separate matrices (the layout mlx-lm runs)."""
    folder = Path(path)
    args = ModelArgs.from_dict(read_config(folder), source=str(folder / "config.json"))
    model = Model(args)
    fill(model, folder, args, model.sanitize(load_weights(folder)), dtype)
    if fuse:
        model.fuse()
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load(path_or_hub_id: str | Path, *, dtype: Optional[mx.Dtype] = None, lazy: bool = False,
         context: Optional[int] = None, kv_bits: Optional[int] = None, kv_group_size: int = 64,
         max_kv_size: Optional[int] = None, fuse: bool = True):
    """`(model, tokenizer)` from a model folder or a hub id.

    Refuses up front (MistralError with the numbers) when the weights, plus the KV cache of
    `context` tokens with the kv options, do not fit this machine's memory (see memory.py)."""
    from . import memory
    from .distributed import launched

    if launched():  # one rank of several under mlx.launch: this rank's shard (distributed/load.py)
        from .distributed.group import world
        from .distributed.load import load as load_shard

        if world() is not None:
            return load_shard(path_or_hub_id, world(), dtype=dtype, context=context, kv_bits=kv_bits,
                              kv_group_size=kv_group_size, max_kv_size=max_kv_size)
    folder = resolve(path_or_hub_id)
    config = read_config(folder)
    weight_files(folder)  # fail on a broken folder before the slow parts
    p = memory.plan(config, context=context or 0, kv_bits=kv_bits, kv_group_size=kv_group_size,
                    max_kv_size=max_kv_size, dtype_bytes=dtype.size if dtype is not None else None)
    memory.check_fits(p, memory.machine_budget(), name=str(path_or_hub_id))
    memory.raise_wired_limit()
    tokenizer = load_tokenizer(folder)
    check_tokenizer(tokenizer, p.args.vocab_size, folder)
    return load_model(folder, dtype=dtype, lazy=lazy, fuse=fuse), tokenizer
