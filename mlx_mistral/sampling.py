"""Sampling parameters, samplers and logits processors (mlx-lm's filters and penalties).

Each request samples with its own random key when it has a seed, so a seeded reply is the same
whether it runs alone or in a batch beside other requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p, apply_top_k, apply_top_p, make_frequency_penalty, make_logits_processors, make_presence_penalty,
)

from .errors import MistralError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

SEED_MODULUS = 2**64  # mx.random.key takes an unsigned 64-bit value
PENALTY_CONTEXT = 20  # ids a repetition penalty looks back over (mlx-lm's default)


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise MistralError(f"{name} must be a finite number, not {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; checked once, when built."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: Optional[int] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[int, float]] = field(default=None, hash=False)

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
            _finite(name, getattr(self, name))
        if self.temperature < 0:
            raise MistralError(f"temperature must be >= 0, not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise MistralError(f"top_p must be in (0, 1], not {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise MistralError(f"min_p must be in [0, 1], not {self.min_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise MistralError(f"top_k must be a whole number >= 0, not {self.top_k!r}")
        if self.repetition_penalty is not None:
            _finite("repetition_penalty", self.repetition_penalty)
            if self.repetition_penalty <= 0:
                raise MistralError(f"repetition_penalty must be > 0, not {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise MistralError(f"{name} must be in [-2, 2], not {getattr(self, name)}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise MistralError(f"seed must be a whole number, not {self.seed!r}")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or token < 0:
                raise MistralError(f"logit_bias keys must be token ids, not {token!r}")
            _finite(f"logit_bias[{token}]", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampler(self, index: int = 0) -> "TokenSampler":
        """The sampler of reply `index` of a request (n > 1 replies draw differently)."""
        return TokenSampler(self, index)

    def processors(self) -> list[LogitsProcessor]:
        """The penalties and the bias, as (history, logits) -> logits functions."""
        out = make_logits_processors(logit_bias=self.logit_bias, repetition_penalty=self.repetition_penalty,
                                     repetition_context_size=PENALTY_CONTEXT)
        if self.presence_penalty:
            out.append(make_presence_penalty(self.presence_penalty))
        if self.frequency_penalty:
            out.append(make_frequency_penalty(self.frequency_penalty))
        return out


class TokenSampler:
    """log-probabilities (1, vocab) -> token id (1,): argmax, or a draw after the filters.

    A seeded sampler splits its own key each draw, so its sequence of draws depends on the seed
    and on nothing else that runs in the process."""

    def __init__(self, params: SamplingParams, index: int = 0):
        self.params = params
        self.key = None if params.seed is None else mx.random.key((params.seed + index) % SEED_MODULUS)

    def __call__(self, logprobs: mx.array) -> mx.array:
        p = self.params
        if p.greedy:
            return mx.argmax(logprobs, axis=-1)
        if 0 < p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k:
            logprobs = apply_top_k(logprobs, p.top_k)
        key = None
        if self.key is not None:
            self.key, key = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1 / p.temperature), key=key)


def sampler_from(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: Optional[int] = None) -> Sampler:
    """Greedy at temperature 0; otherwise temperature with top-k, top-p and min-p filters."""
    return SamplingParams(temperature, top_p, top_k, min_p, seed).sampler()


def processors_from(repetition_penalty: Optional[float] = None, repetition_context_size: int = PENALTY_CONTEXT,
                    logit_bias: Optional[dict[int, float]] = None) -> list[LogitsProcessor]:
    SamplingParams(repetition_penalty=repetition_penalty, logit_bias=logit_bias)  # the same checks
    return make_logits_processors(logit_bias=logit_bias, repetition_penalty=repetition_penalty,
                                  repetition_context_size=repetition_context_size)
