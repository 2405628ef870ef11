"""Model hyper-parameters, read from HF `config.json` or Mistral's `params.json`."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Optional

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
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise MistralError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """From an HF config.json dict; unknown keys are dropped."""
        config = dict(config)
        model_type = config.get("model_type", "mistral")
        if model_type not in ("mistral", "llama"):
            raise MistralError(f"unsupported model_type {model_type!r} (expected mistral or llama)")
        # newer transformers nest rope settings in rope_parameters
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise MistralError(f"unsupported RoPE scaling {rope_type!r}: only plain RoPE is implemented")
        if config.get("sliding_window"):
            raise MistralError("sliding-window attention is not supported (Mistral Small 3 has none)")
        if config.get("head_dim") is None:
            config.pop("head_dim", None)
        fields = set(inspect.signature(cls).parameters)
        missing = {"hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"} - set(config)
        if missing:
            raise MistralError(f"config.json lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in config.items() if k in fields})

    @classmethod
    def from_params(cls, params: dict) -> "ModelArgs":
        """From Mistral's params.json (the consolidated checkpoint's config)."""
        missing = {"dim", "n_layers", "hidden_dim", "n_heads", "vocab_size"} - set(params)
        if missing:
            raise MistralError(f"params.json lacks {', '.join(sorted(missing))}")
        config = {hf: params[k] for k, hf in PARAMS_TO_HF.items() if k in params}
        config.setdefault("rope_theta", 1e6)  # Mistral's default when params.json omits it
        return cls.from_dict(config)

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
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]
