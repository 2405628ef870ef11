"""Turning the generated reply into OpenAI's `content`, `tool_calls` and `finish_reason`.

The parsing is tools.py's `ToolCallStream` (the split is made on the [TOOL_CALLS] id, never on
text); this adds what the server needs around it: the deltas of a streamed reply and, for a
whole reply, the same pieces put together. Both read the stop-filtered text the generator
yields, so a stop sequence cuts the reply the same way in either shape.
"""

from __future__ import annotations

from typing import Optional

from .tools import ToolCallStream, call_marker


class ReplyAssembler:
    """Fed the streamed pieces of one reply; gives OpenAI deltas as they come and, at the end,
    the finish reason and the whole assistant message."""

    def __init__(self, tokenizer):
        self.calls = ToolCallStream(call_marker(tokenizer))
        self.content: list[str] = []

    def _collect(self, deltas: list[dict]) -> list[dict]:
        self.content += [d["content"] for d in deltas if "content" in d]
        return deltas

    def feed(self, text: str, token: Optional[int]) -> list[dict]:
        """Deltas to stream now: `{"content": ...}` or `{"tool_calls": [...]}`."""
        return self._collect(self.calls.feed(token, text))

    def finish(self, finish_reason: str) -> tuple[list[dict], str]:
        """(closing deltas, finish reason): "tool_calls" when the reply made calls; a call list
        that did not parse (possible only unconstrained, or cut short) comes out as content."""
        deltas = self._collect(self.calls.finish())
        return deltas, "tool_calls" if self.calls.calls else finish_reason

    def message(self) -> dict:
        """The whole reply (after `finish`) as {"role", "content", "tool_calls"?}."""
        content = "".join(self.content)
        if not self.calls.calls:
            return {"role": "assistant", "content": content}
        return {"role": "assistant", "content": content.strip() or None, "tool_calls": self.calls.calls}
