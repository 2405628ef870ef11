"""Samplers and logits processors: mlx-lm's, configured from our sampling parameters."""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def sampler_from(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Sampler:
    """Greedy at temperature 0; otherwise temperature with top-k, top-p and min-p filters."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    return make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)  # top_p 1.0 = off


def processors_from(
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    logit_bias: Optional[dict[int, float]] = None,
) -> list[LogitsProcessor]:
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ValueError("repetition_penalty must be > 0")
    return make_logits_processors(
        logit_bias=logit_bias,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
    )
