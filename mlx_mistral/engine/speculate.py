"""Speculative decoding: draft several tokens cheaply, verify them in one forward pass.

Two drafters share one verification loop:
- prompt lookup: the tokens that followed the most recent earlier occurrence of the last n-gram
  of prompt + reply (no second model; strong when the reply quotes or edits the prompt);
- a draft model: a smaller model with the same vocabulary, decoding greedily.

Both drafts are deterministic, so the standard acceptance rule (accept d with probability
min(1, p(d) / q(d)), else sample from max(0, p - q) renormalised) reduces to: accept d with
probability p(d), else sample from p with d removed. Drawing t ~ p and accepting d when t == d
is exactly that rule (P(accept) = p(d), and a rejected draw is p conditioned on t != d), and it
works for any sampler (top-p, top-k, min-p filters included) because it only calls the sampler.
At temperature 0 it is plain greedy decoding: the output equals generate_step's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Optional, Protocol

import mlx.core as mx

from ..cache import can_trim_prompt_cache, trim_prompt_cache
from ..errors import MistralError
from ..sampling import LogitsProcessor, Sampler
from .backend import backend_for
from .steps import DEFAULT_PREFILL_STEP, generate_step, generation_stream, greedy, prefill

MODES = ("none", "lookup", "draft")
DEFAULT_NUM_DRAFT = 4  # longer drafts rarely survive whole and every drafted token costs compute
DEFAULT_NGRAM = 3  # longest n-gram matched; shorter ones are tried when it has no earlier match


@dataclass
class SpeculationStats:
    """Counts one speculative run fills in, for --verbose and the benchmarks."""

    mode: str = "none"
    forward_passes: int = 0  # verification passes of the target model
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target model agreed with
    tokens: int = 0  # tokens yielded

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.forward_passes if self.forward_passes else 0.0

    def summary(self) -> str:
        return (f"speculation: {self.mode}, {self.accepted}/{self.drafted} drafted tokens accepted "
                f"({100 * self.acceptance:.0f}%), {self.tokens_per_pass:.2f} tokens per forward pass")


class Drafter(Protocol):
    def propose(self, k: int) -> mx.array:
        """Up to k draft ids (1-D int32) continuing the text so far."""

    def update(self, drafts: list[int], accepted: int, emitted: list[int]) -> None:
        """`accepted` leading drafts were kept; `emitted` are the ids this round added."""


# --- prompt lookup -------------------------------------------------------------------------------


class NgramIndex:
    """For every n-gram (n = 1..ngram) of a growing id sequence: where the ids after its most
    recent occurrence start. Updated in O(ngram) per id, so lookups stay cheap on long prompts."""

    def __init__(self, ids: list[int], ngram: int = DEFAULT_NGRAM):
        if ngram < 1:
            raise MistralError("ngram must be at least 1")
        self.ngram = ngram
        self.ids: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}
        self.extend(ids)

    def extend(self, ids: list[int]) -> None:
        for token in ids:
            # the n-grams ending just before `token` now have a continuation starting at it
            end = len(self.ids)
            for n in range(1, min(self.ngram, end) + 1):
                self.after[tuple(self.ids[end - n : end])] = end
            self.ids.append(token)

    def draft(self, k: int) -> list[int]:
        """The up to k ids that followed the last n-gram before, longest n-gram first."""
        for n in range(min(self.ngram, len(self.ids)), 0, -1):
            start = self.after.get(tuple(self.ids[-n:]))
            if start is not None:
                return self.ids[start : start + k]
        return []


class LookupDrafter:
    def __init__(self, prompt: list[int], ngram: int):
        self.index = NgramIndex(prompt, ngram)

    def propose(self, k: int) -> mx.array:
        return mx.array(self.index.draft(k), dtype=mx.int32)

    def update(self, drafts: list[int], accepted: int, emitted: list[int]) -> None:
        self.index.extend(emitted)


# --- draft model ---------------------------------------------------------------------------------


def check_draft(model, draft_model, tokenizer=None, draft_tokenizer=None) -> None:
    """Refuse a draft model whose ids do not mean the same tokens as the target's."""
    v, dv = model.args.vocab_size, draft_model.args.vocab_size
    if v != dv:
        raise MistralError(f"the draft model's vocabulary ({dv} ids) does not match the model's ({v} ids)")
    if tokenizer is None or draft_tokenizer is None:
        return
    probe = "Speculative decoding: def f(x):\n    return x * 2  # ünïcode 東京"
    if (type(tokenizer) is not type(draft_tokenizer) or tokenizer.vocab_size != draft_tokenizer.vocab_size
            or tokenizer.encode(probe) != draft_tokenizer.encode(probe)):
        raise MistralError("the draft model's tokenizer does not match the model's")


class ModelDrafter:
    """Greedy drafts from a smaller model, whose own KV cache is rolled back like the target's."""

    def __init__(self, draft_model, prompt: mx.array, prefill_step_size: int):
        self.model = backend_for(draft_model)
        self.cache = self.model.make_cache()
        prefill(draft_model, prompt[:-1], self.cache, prefill_step_size)
        self.pending = prompt[-1:]  # ids the draft cache has not seen yet, (P,)
        self.fed = 0  # draft ids fed through the draft model in the last proposal

    def propose(self, k: int) -> mx.array:
        drafts = []
        ids = self.pending
        for _ in range(k):
            # lazy graph: the k steps are evaluated together with the verification pass
            ids = mx.argmax(self.model(ids[None], self.cache)[0, -1], keepdims=True)  # (1,)
            drafts.append(ids)
        self.fed = k - 1  # the last draft was proposed but never fed
        return mx.concatenate(drafts).astype(mx.int32)

    def update(self, drafts: list[int], accepted: int, emitted: list[int]) -> None:
        new = mx.array(emitted[-1:], dtype=mx.int32)
        if not drafts:  # nothing proposed: the draft cache still lacks `pending`
            self.pending = mx.concatenate([self.pending, new])
        elif accepted == len(drafts):  # every draft kept: the last one still needs feeding
            self.pending = mx.array([drafts[-1], emitted[-1]], dtype=mx.int32)
        else:
            trim_prompt_cache(self.cache, self.fed - accepted)
            self.pending = new


# --- the verification loop -----------------------------------------------------------------------


def _verify(run, cache, sampler: Sampler, processors: Optional[list[LogitsProcessor]], history: mx.array,
            y: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
    """Target tokens and log-probabilities after y and after each draft, (1+d,), (1+d, vocab)."""
    inputs = mx.concatenate([y, drafts])  # (1+d,)
    logits = run(inputs[None], cache)[0]  # (1+d, vocab)
    if processors:
        rows = []
        for i in range(inputs.size):
            # row i continues history + inputs[:i+1] (the first y already is in history)
            seen = mx.concatenate([history, inputs[1 : i + 1]]) if i else history
            row = logits[i : i + 1]
            for processor in processors:
                row = processor(seen, row)
            rows.append(row)
        logits = mx.concatenate(rows)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs), logprobs


def _accepted(drafts: list[int], tokens: list[int]) -> int:
    """How many leading drafts the target model agreed with."""
    n = 0
    while n < len(drafts) and tokens[n] == drafts[n]:
        n += 1
    return n


def _speculative_loop(
    prompt: mx.array,
    model,
    make_drafter: Callable[[mx.array], Drafter],
    *,
    num_draft: int,
    stats: SpeculationStats,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[list[LogitsProcessor]] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Generator[tuple[int, mx.array], None, None]:
    if prompt.size == 0:
        raise MistralError("the prompt is empty: nothing to continue from")
    if num_draft < 0:
        raise MistralError("num_draft must be >= 0")
    run = backend_for(model)
    cache = prompt_cache if prompt_cache is not None else run.make_cache()
    if not can_trim_prompt_cache(cache):
        kinds = sorted({type(c).__name__ for c in cache if not c.is_trimmable()})
        raise MistralError(f"speculative decoding needs a KV cache that can roll back; {', '.join(kinds)} cannot")
    sampler = sampler or greedy
    prompt = prompt.astype(mx.int32)
    history = prompt  # ids the logits processors look back over, (L,)
    with mx.stream(generation_stream):
        prefill(model, prompt[:-1], cache, prefill_step_size, progress)
        drafter = make_drafter(prompt)
        y = prompt[-1:]  # the id whose K/V the cache lacks and whose logits come next, (1,)
        ntoks = 0
        rollback = 0  # cache entries past the last yielded token, trimmed if the caller stops early
        try:
            while ntoks < max_tokens:
                k = min(num_draft, max_tokens - ntoks - 1)
                drafts = drafter.propose(k) if k > 0 else mx.array([], dtype=mx.int32)
                tokens, logprobs = _verify(run, cache, sampler, logits_processors, history, y, drafts)
                mx.eval(tokens, logprobs, drafts)
                draft_list = drafts.tolist()
                n = _accepted(draft_list, tokens.tolist())
                # keep y and the n accepted drafts; the token after them is new and not yet cached
                trim_prompt_cache(cache, len(draft_list) - n)
                emitted = tokens.tolist()[: n + 1]
                drafter.update(draft_list, n, emitted)
                if logits_processors:
                    history = mx.concatenate([history, mx.array(emitted, dtype=mx.int32)])
                stats.forward_passes += 1
                stats.drafted += len(draft_list)
                stats.accepted += n
                for i, token in enumerate(emitted):
                    rollback = n - i
                    stats.tokens += 1
                    ntoks += 1
                    yield token, logprobs[i]
                rollback = 0
                y = mx.array(emitted[-1:], dtype=mx.int32)
                if stats.forward_passes % 64 == 0:
                    mx.clear_cache()
        finally:
            # stopped mid-round: the cache holds the prompt and every yielded token but the last
            trim_prompt_cache(cache, rollback)


def lookup_generate_step(
    prompt: mx.array,
    model,
    *,
    num_draft: int = DEFAULT_NUM_DRAFT,
    ngram: int = DEFAULT_NGRAM,
    stats: Optional[SpeculationStats] = None,
    **kwargs,
) -> Generator[tuple[int, mx.array], None, None]:
    """generate_step with prompt-lookup drafts: yields the same (token id, log-probabilities) and
    takes the same keyword arguments (max_tokens, sampler, logits_processors, prompt_cache, ...)."""
    if ngram < 1:
        raise MistralError("ngram must be at least 1")
    stats = stats if stats is not None else SpeculationStats()
    stats.mode = "lookup"
    yield from _speculative_loop(
        prompt, model, lambda p: LookupDrafter(p.tolist(), ngram), num_draft=num_draft, stats=stats, **kwargs,
    )


def draft_generate_step(
    prompt: mx.array,
    model,
    draft_model,
    *,
    num_draft: int = DEFAULT_NUM_DRAFT,
    stats: Optional[SpeculationStats] = None,
    **kwargs,
) -> Generator[tuple[int, mx.array], None, None]:
    """generate_step with a draft model's greedy proposals: yields the same pairs and takes the
    same keyword arguments (max_tokens, sampler, logits_processors, prompt_cache, ...)."""
    check_draft(model, draft_model)
    stats = stats if stats is not None else SpeculationStats()
    stats.mode = "draft"
    prefill_step_size = kwargs.get("prefill_step_size", DEFAULT_PREFILL_STEP)
    yield from _speculative_loop(
        prompt, model, lambda p: ModelDrafter(draft_model, p, prefill_step_size), num_draft=num_draft,
        stats=stats, **kwargs,
    )


# --- choosing a mode -----------------------------------------------------------------------------


# The mode used when none is asked for, per MLX backend, from benchmarks/speculate.py
# (results/cpu/speculate.json, SmolLM2). On the CPU prompt lookup won where the reply copies the
# prompt in fp32 (summary ~1.9x) but lost on an edit prompt the model did not echo (~0.5x), and
# with 4-bit weights, where a pass over k+1 tokens costs ~3 one-token passes, 70% acceptance
# only broke even and 31% halved the speed: off. GPUs, where k+1 tokens should cost about one
# token's weight reads, are not measured yet: off until a measurement shows the gain.
DEFAULT_MODE = {"cpu": "none", "gpu": "none"}


def default_mode(model) -> str:
    """The measured default for the backend in use (see DEFAULT_MODE)."""
    return DEFAULT_MODE[mx.default_device().type.name]


def select_step(speculate: Optional[str], model, *, num_draft: Optional[int] = None, draft_model=None,
                tokenizer=None, draft_tokenizer=None, stats: Optional[SpeculationStats] = None):
    """A function with generate_step's signature for `speculate` ("none", "lookup", "draft",
    or None for the backend's default)."""
    mode = default_mode(model) if speculate is None else speculate
    if mode not in MODES:
        raise MistralError(f"speculate must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "draft" and draft_model is None:
        raise MistralError("speculate='draft' needs a draft model (--draft-model PATH)")
    if mode != "draft" and draft_model is not None and speculate is not None:
        raise MistralError("a draft model is only used with speculate='draft'")
    stats = stats if stats is not None else SpeculationStats()
    stats.mode = mode
    k = DEFAULT_NUM_DRAFT if num_draft is None else num_draft
    if k < 0:
        raise MistralError("num_draft must be >= 0")
    if mode == "lookup":
        return lambda prompt, model, **kw: lookup_generate_step(prompt, model, num_draft=k, stats=stats, **kw)
    if mode == "draft":
        check_draft(model, draft_model, tokenizer, draft_tokenizer)
        return lambda prompt, model, **kw: draft_generate_step(prompt, model, draft_model, num_draft=k,
                                                               stats=stats, **kw)
    return generate_step
