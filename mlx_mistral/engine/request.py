"""The request object: everything one generation needs, checked once, when it is built.

The Python API, the CLI and the server each build a `Request` and hand it to the engine; nothing
below them passes sampling, stop, constraint or KV settings as loose keywords.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..cache import KVSettings
from ..constrain import Limits, ToolChoice
from ..errors import MistralError
from ..sampling import LogitsProcessor, SamplingParams

SPECULATION_MODES = ("none", "lookup", "draft")
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


@dataclass(frozen=True)
class Constraint:
    """The tool choice and reply format a grammar enforces (see constrain.plan)."""

    tools: Optional[list[dict]] = field(default=None, hash=False)
    tool_choice: ToolChoice = "auto"
    response_format: Optional[dict] = field(default=None, hash=False)
    parallel_tool_calls: bool = True
    limits: Limits = Limits()

    def kwargs(self) -> dict:
        return dict(tools=self.tools, tool_choice=self.tool_choice, response_format=self.response_format,
                    parallel_tool_calls=self.parallel_tool_calls, limits=self.limits)


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding for one request: None picks the backend's measured default."""

    mode: Optional[str] = None
    num_draft: Optional[int] = None
    draft_model: Any = field(default=None, hash=False, compare=False)

    def __post_init__(self):
        if self.mode is not None and self.mode not in SPECULATION_MODES:
            raise MistralError(f"speculate must be one of {', '.join(SPECULATION_MODES)}, not {self.mode!r}")
        if self.num_draft is not None and self.num_draft < 0:
            raise MistralError("num_draft must be >= 0")


@dataclass(frozen=True)
class Request:
    """One generation: prompt ids in, up to `max_tokens` ids out (`n` independent replies)."""

    prompt: tuple[int, ...]
    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    constraint: Constraint = Constraint()
    logits_processors: tuple[LogitsProcessor, ...] = ()
    kv: KVSettings = KVSettings()
    speculation: Speculation = Speculation()
    logprobs: Optional[int] = None  # None: none; k: the chosen id's and the k most likely
    n: int = 1

    def __post_init__(self):
        prompt = tuple(self.prompt)
        if not prompt:
            raise MistralError("the prompt is empty: nothing to continue from")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in prompt):
            raise MistralError("the prompt must be token ids (whole numbers >= 0)")
        object.__setattr__(self, "prompt", prompt)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors or ()))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise MistralError(f"max_tokens must be at least 1, not {self.max_tokens!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise MistralError(f"n must be at least 1, not {self.n!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise MistralError(f"logprobs must be between 0 and {MAX_LOGPROBS}, not {self.logprobs}")
        self.kv.check()

    def check_fits(self, vocab_size: int, context_length: int) -> None:
        """Refuses ids outside the vocabulary and a prompt the context cannot hold."""
        if len(self.prompt) >= context_length:
            raise MistralError(f"the prompt has {len(self.prompt)} tokens, but the model's context holds "
                               f"{context_length}: no room for a reply")
        bad = next((i for i in self.prompt if i >= vocab_size), None)
        if bad is not None:
            raise MistralError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")

    def room(self, context_length: int) -> int:
        """max_tokens, capped where the context runs out."""
        return min(self.max_tokens, context_length - len(self.prompt))
