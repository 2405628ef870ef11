"""Turning the generated reply into OpenAI's `content`, `tool_calls` and `finish_reason`.

This is the one place the server reads meaning into generated text. A Mistral tool call is the
[TOOL_CALLS] control token followed by a JSON list `[{"name": ..., "arguments": {...}}]`; the
detokenizer drops control tokens, so the split is made on the token id, not on the text.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Optional

CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")  # the V7 chat format accepts only such ids


def tool_calls_token(tokenizer) -> Optional[int]:
    """The [TOOL_CALLS] id of a Tekken tokenizer; None for tokenizers without one."""
    from .tokenizer import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.tekken.get_special_token("[TOOL_CALLS]")
    return None


def new_call_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def parse_tool_calls(text: str) -> Optional[list[dict]]:
    """`[{"name": ..., "arguments": {...}, "id"?: ...}, ...]` as OpenAI tool calls, or None if
    the text is not such a list."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(calls, dict):  # a lone call without the list brackets
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
            return None
        arguments = call["arguments"]
        call_id = call.get("id")
        out.append({
            "id": call_id if isinstance(call_id, str) and CALL_ID.match(call_id) else new_call_id(),
            "type": "function",
            "function": {"name": call["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
        })
    return out


@dataclass
class Reply:
    content: Optional[str]  # None when the reply is only tool calls
    tool_calls: Optional[list[dict]]
    finish_reason: str
    unsent: str  # text held back while streaming that turned out to be plain content

    def message(self) -> dict:
        out = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class ReplyAssembler:
    """Fed the streamed pieces of one reply; says what may be streamed as content right away
    and, at the end, what the reply was."""

    def __init__(self, tool_calls_id: Optional[int]):
        self.tool_calls_id = tool_calls_id
        self.content: list[str] = []
        self.call_text: Optional[list[str]] = None  # a list once [TOOL_CALLS] was generated

    def feed(self, text: str, token: Optional[int]) -> str:
        """Content text to stream now (none once the reply has turned into tool calls)."""
        if self.call_text is None and token is not None and token == self.tool_calls_id:
            self.call_text = []
        if self.call_text is not None:
            self.call_text.append(text)
            return ""
        self.content.append(text)
        return text

    def finish(self, finish_reason: str) -> Reply:
        content = "".join(self.content)
        if self.call_text is None:
            return Reply(content, None, finish_reason, "")
        held = "".join(self.call_text)
        calls = parse_tool_calls(held)
        if calls is None:  # cut short or malformed: what was generated is the reply
            return Reply(content + held, None, finish_reason, held)
        return Reply(content or None, calls, "tool_calls", "")
