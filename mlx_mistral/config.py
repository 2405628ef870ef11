"""Model hyper-parameters, read from HF `config.json` or Mistral's `params.json`, checked once
when read; and the weight-name and shape table they imply.

Every field is checked for type and range before anything is sized from it, so a broken or
absurd config is one line naming the field, never a traceback or an allocation that runs the
machine out of memory.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .errors import MistralError

# params.json key -> HF config.json key
PARAMS_TO_HF = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "head_dim": "head_dim",
    "hidden_dim": "intermediate_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "norm_eps": "rms_norm_eps",
    "vocab_size": "vocab_size",
    "rope_theta": "rope_theta",
}
HF_TO_PARAMS = {hf: k for k, hf in PARAMS_TO_HF.items()}
# fields with a default that HF configs may set to null
OPTIONAL_FIELDS = ("num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                   "max_position_embeddings", "model_type")

# field -> (least, most). The upper bounds are far beyond any released model (Mistral Large 2:
# 12288 wide, 88 layers, 28672 FFN) yet small enough that the shape table stays short and no
# size computed from them overflows a machine before the weights are even looked at.
INT_RANGES = {
    "hidden_size": (1, 1 << 17),
    "num_hidden_layers": (1, 1024),
    "intermediate_size": (1, 1 << 20),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (2, 4096),
    "vocab_size": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 24),
}
MAX_PARAMETERS = 2 * 10**12  # 4 TB in bf16: no machine holds it, so a config that implies more is wrong
# what mx.quantize accepts: mode -> (group sizes, bits)
QUANT_MODES = {
    "affine": ((32, 64, 128), (2, 3, 4, 5, 6, 8)),
    "mxfp4": ((32,), (4,)),
    "mxfp8": ((32,), (8,)),
    "nvfp4": ((16,), (4,)),
}


class ConfigError(MistralError):
    """A config field with a wrong type or an out-of-range value."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"model config: {field} {problem}")


def _shown(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(field: str, value: Any) -> None:
    lo, hi = INT_RANGES[field]
    if not _is_int(value) or not lo <= value <= hi:
        raise ConfigError(field, f"must be a whole number from {lo} to {hi}, not {_shown(value)}")


def _check_quantization(field: str, q: Any, top: bool) -> None:
    """mlx-lm's `quantization` entry: group_size/bits/mode, plus per-layer dicts or false."""
    if not isinstance(q, dict):
        raise ConfigError(field, f"must be an object with group_size and bits, not {_shown(q)}")
    mode = q.get("mode", "affine")
    if mode not in QUANT_MODES:
        raise ConfigError(f"{field}.mode", f"must be one of {', '.join(QUANT_MODES)}, not {_shown(mode)}")
    group_sizes, bits = QUANT_MODES[mode]
    if q.get("group_size") not in group_sizes or not _is_int(q.get("group_size")):
        raise ConfigError(f"{field}.group_size", f"must be one of {', '.join(map(str, group_sizes))} "
                          f"for {mode} quantization, not {_shown(q.get('group_size'))}")
    if q.get("bits") not in bits or not _is_int(q.get("bits")):
        raise ConfigError(f"{field}.bits", f"must be one of {', '.join(map(str, bits))} for {mode} "
                          f"quantization, not {_shown(q.get('bits'))}")
    if top:
        for key, value in q.items():
            if isinstance(value, dict):
                _check_quantization(f"{field}.{key}", value, top=False)


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    model_type: str = "mistral"
    bos_token_id: int = 1
    eos_token_id: Any = 2
    # mlx-lm folder format: {"group_size": 64, "bits": 4, "<layer path>": {...} | False}
    quantization: Optional[dict] = None

    def __post_init__(self):
        for field in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                      "vocab_size", "max_position_embeddings"):
            _check_int(field, getattr(self, field))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _check_int("num_key_value_heads", self.num_key_value_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("head_dim", f"is missing and hidden_size ({self.hidden_size}) is not a "
                                  f"multiple of num_attention_heads ({self.num_attention_heads})")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_int("head_dim", self.head_dim)
        self._check_rest()

    def _check_rest(self) -> None:
        if self.head_dim % 2:
            raise ConfigError("head_dim", f"must be even (RoPE rotates pairs), not {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_key_value_heads", f"({self.num_key_value_heads}) must divide the number of "
                              f"attention heads ({self.num_attention_heads})")
        for field, lo, hi in (("rms_norm_eps", 0.0, 1.0), ("rope_theta", 0.0, 1e15)):
            value = getattr(self, field)
            if not _is_number(value) or not lo < value < hi:
                raise ConfigError(field, f"must be a number above {lo:g} and below {hi:g}, not {_shown(value)}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError("tie_word_embeddings", f"must be true or false, not {_shown(self.tie_word_embeddings)}")
        if self.bos_token_id is not None and not (_is_int(self.bos_token_id) and self.bos_token_id >= 0):
            raise ConfigError("bos_token_id", f"must be a token id or null, not {_shown(self.bos_token_id)}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if self.eos_token_id is not None and not (eos and all(_is_int(t) and t >= 0 for t in eos)):
            raise ConfigError("eos_token_id", f"must be a token id, a list of them or null, not {_shown(self.eos_token_id)}")
        if self.quantization is not None:
            _check_quantization("quantization", self.quantization, top=True)
        n = self.parameter_count
        if n > MAX_PARAMETERS:
            raise ConfigError("num_hidden_layers", f"and the other sizes imply {n:.3g} parameters, more than "
                              f"any machine holds ({MAX_PARAMETERS:.0e})")

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(shape) for _, shape in tensor_shapes(self))

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelArgs":
        """From an HF config.json dict; unknown keys are dropped. Errors name `source`."""
        if not isinstance(config, dict):
            raise MistralError(f"{source} must be a JSON object, not {type(config).__name__}")
        try:
            return cls._from_dict(dict(config))
        except ConfigError as e:
            raise MistralError(f"{source}: {e.field} {e.problem}") from None

    @classmethod
    def _from_dict(cls, config: dict) -> "ModelArgs":
        model_type = config.get("model_type", "mistral")
        if model_type not in ("mistral", "llama"):
            raise ConfigError("model_type", f"{_shown(model_type)} is not supported (expected mistral or llama)")
        # newer transformers nest rope settings in rope_parameters
        for key in ("rope_parameters", "rope_scaling"):
            if config.get(key) is not None and not isinstance(config[key], dict):
                raise ConfigError(key, f"must be an object or null, not {_shown(config[key])}")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        for key in OPTIONAL_FIELDS:  # HF writes null for "unset": the default applies
            if key in config and config[key] is None:
                del config[key]
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise MistralError(f"unsupported RoPE scaling {rope_type!r}: only plain RoPE is implemented")
        if config.get("sliding_window"):
            raise MistralError("sliding-window attention is not supported (Mistral Small 3 has none)")
        fields = set(inspect.signature(cls).parameters)
        missing = {"hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"} - set(config)
        if missing:
            raise ConfigError(sorted(missing)[0], "is missing" + (f" (so are {', '.join(sorted(missing)[1:])})"
                                                                   if len(missing) > 1 else ""))
        return cls(**{k: v for k, v in config.items() if k in fields})

    @classmethod
    def from_params(cls, params: dict, source: str = "params.json") -> "ModelArgs":
        """From Mistral's params.json (the consolidated checkpoint's config)."""
        if not isinstance(params, dict):
            raise MistralError(f"{source} must be a JSON object, not {type(params).__name__}")
        missing = {"dim", "n_layers", "hidden_dim", "n_heads", "vocab_size"} - set(params)
        if missing:
            raise MistralError(f"{source} lacks {', '.join(sorted(missing))}")
        config = {hf: params[k] for k, hf in PARAMS_TO_HF.items() if k in params}
        config.setdefault("rope_theta", 1e6)  # Mistral's default when params.json omits it
        try:
            return cls._from_dict(config)
        except ConfigError as e:
            raise MistralError(f"{source}: {HF_TO_PARAMS.get(e.field, e.field)} {e.problem}") from None

    def to_hf_dict(self) -> dict:
        """The HF config.json a converted folder carries (mlx-lm reads the same keys)."""
        d = dataclasses.asdict(self)
        if d["quantization"] is None:
            d.pop("quantization")
        d["architectures"] = ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"]
        d["hidden_act"] = "silu"
        return d

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def tensor_shapes(args: ModelArgs) -> Iterator[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes in checkpoint order."""
    d, hd = args.hidden_size, args.head_dim
    yield "model.embed_tokens.weight", (args.vocab_size, d)
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (d,)
        yield f"{p}.self_attn.q_proj.weight", (args.num_attention_heads * hd, d)
        yield f"{p}.self_attn.k_proj.weight", (args.num_key_value_heads * hd, d)
        yield f"{p}.self_attn.v_proj.weight", (args.num_key_value_heads * hd, d)
        yield f"{p}.self_attn.o_proj.weight", (d, args.num_attention_heads * hd)
        yield f"{p}.post_attention_layernorm.weight", (d,)
        yield f"{p}.mlp.gate_proj.weight", (args.intermediate_size, d)
        yield f"{p}.mlp.up_proj.weight", (args.intermediate_size, d)
        yield f"{p}.mlp.down_proj.weight", (d, args.intermediate_size)
    yield "model.norm.weight", (d,)
    if not args.tie_word_embeddings:
        yield "lm_head.weight", (args.vocab_size, d)
