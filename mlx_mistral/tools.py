"""Tool calls in and out: request checks, and parsing `[TOOL_CALLS]` + JSON list into OpenAI's shape.

The detokenizer drops special tokens, so a call is found by the id of `[TOOL_CALLS]` in the
generated ids, never by text. What follows it is a JSON list `[{"name", "arguments", "id"?}]`;
a reply that does not parse as one (possible only without constraints) is kept as plain content.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Optional

from .constrain import TOOL_CALLS_ID
from .errors import MistralError

CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """9 random characters [a-zA-Z0-9], the id format Mistral's chat format requires."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


# ---------------------------------------------------------------------------- request checks

def validate_request(messages: list[dict], tools: Optional[list[dict]] = None) -> None:
    """What mistral-common lets through but the chat format cannot mean: malformed tool
    definitions, unparsable call arguments, tool results answering no earlier call."""
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise MistralError('each tool must be {"type": "function", "function": {"name": ..., ...}}')
        if not FUNCTION_NAME.match(fn["name"]):
            raise MistralError(f"tool name {fn['name']!r} must be 1-64 characters of a-z, A-Z, 0-9, _ or -")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise MistralError(f"tool {fn['name']!r}: parameters must be a JSON schema object")
    names = [t["function"]["name"] for t in tools or []]
    if len(set(names)) != len(names):
        raise MistralError(f"tool names must be unique: {names}")
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "assistant":
            for call in message.get("tool_calls") or []:
                call_id = call.get("id")
                fn = call.get("function") or {}
                if not isinstance(call_id, str) or not CALL_ID.match(call_id):
                    raise MistralError(f"message {i}: tool call id {call_id!r} must be 9 characters of a-z, A-Z, 0-9")
                if not isinstance(fn.get("name"), str) or not FUNCTION_NAME.match(fn["name"]):
                    raise MistralError(f"message {i}: tool call name {fn.get('name')!r} is not a valid function name")
                arguments = fn.get("arguments", "{}")
                if isinstance(arguments, str):
                    try:
                        json.loads(arguments)
                    except json.JSONDecodeError:
                        raise MistralError(f"message {i}: arguments of {fn['name']!r} are not valid JSON") from None
                open_calls.add(call_id)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in open_calls:
                raise MistralError(f"message {i}: tool result for {call_id!r} answers no earlier tool call")


# ---------------------------------------------------------------------------- whole replies

def _openai_call(call: Any) -> Optional[dict]:
    """One parsed call in OpenAI shape, or None if it is not a call."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some replies carry arguments already as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    call_id = call.get("id")
    return {
        "id": call_id if isinstance(call_id, str) and CALL_ID.match(call_id) else new_call_id(),
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def parse_calls_text(text: str) -> Optional[list[dict]]:
    """The JSON list after `[TOOL_CALLS]` as OpenAI tool calls; None if it is not one."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text.strip())  # text after the list is ignored
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict):  # a single call without the list
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    calls = [_openai_call(c) for c in value]
    return None if any(c is None for c in calls) else calls


def call_marker(tokenizer) -> Optional[int]:
    """The id that starts tool calls: [TOOL_CALLS] for Tekken, none for other tokenizers."""
    return TOOL_CALLS_ID if getattr(tokenizer, "mistral", None) is not None else None


def parse_reply(tokens: list[int], tokenizer) -> dict:
    """Generated ids (without EOS) -> OpenAI assistant message {"role", "content", "tool_calls"?}."""
    if call_marker(tokenizer) is None or TOOL_CALLS_ID not in tokens:
        return {"role": "assistant", "content": tokenizer.decode(tokens)}
    at = tokens.index(TOOL_CALLS_ID)
    before = tokenizer.decode(tokens[:at])
    raw = tokenizer.decode([t for t in tokens[at + 1:] if t != TOOL_CALLS_ID])
    calls = parse_calls_text(raw)
    if calls is None:
        stream = ToolCallStream(None)  # read as a stream does: a list cut short keeps its whole calls
        stream.in_calls = True
        stream.feed(None, raw)
        stream.finish()
        if not stream.cut:  # malformed (unconstrained) output: the text is all there is
            return {"role": "assistant", "content": before + raw}
        if not stream.calls:
            return {"role": "assistant", "content": before}
        calls = stream.calls
    return {"role": "assistant", "content": before.strip() or None, "tool_calls": calls}


# ---------------------------------------------------------------------------- streaming

def merge_call_deltas(calls: dict[int, dict], pieces: list[dict]) -> None:
    """Fold streamed `delta["tool_calls"]` pieces into whole OpenAI calls, keyed by index."""
    for piece in pieces:
        call = calls.setdefault(piece["index"], {"id": piece.get("id"), "type": "function",
                                                 "function": {"name": "", "arguments": ""}})
        function = piece.get("function", {})
        call["function"]["name"] += function.get("name", "")
        call["function"]["arguments"] += function.get("arguments", "")


@dataclass
class _Call:
    index: int
    key: str = ""  # the member being read
    buffer: str = ""  # its key text, then its value text
    name: Optional[str] = None
    id: Optional[str] = None
    held_args: list[str] = field(default_factory=list)  # arguments read before the name


class ToolCallStream:
    """Splits a streamed reply into text deltas and OpenAI tool-call deltas.

    `feed(token, text)` takes each generated id with its detokenized text and returns deltas:
    `{"content": str}` before `[TOOL_CALLS]`; then, per call, `{"tool_calls": [{"index", "id",
    "type": "function", "function": {"name", "arguments": ""}}]}` once its name is read and
    `{"tool_calls": [{"index", "function": {"arguments": piece}}]}` as its arguments arrive.
    `finish()` returns the closing deltas and fills `calls` (the complete OpenAI tool calls,
    with the ids already streamed); `failed` says the list did not parse, and then its raw
    text comes out as content (after any call deltas already sent).

    A call's deltas are held until its object closes, so a reply cut short (`cut`: max_tokens or
    a stop) streams exactly the complete calls a whole reply returns, never a half call.
    """

    def __init__(self, marker: Optional[int] = TOOL_CALLS_ID):
        self.marker = marker  # the id that starts the calls (see `call_marker`)
        self.in_calls = False
        self.raw = ""  # text after [TOOL_CALLS]
        self.stack: list[str] = []  # open JSON containers
        self.in_string = False
        self.escape = False
        self.expect = "key"  # key | colon | value, inside a call object
        self.call: Optional[_Call] = None
        self.ids: list[str] = []  # announced call ids, by index
        self.done = False
        self.failed = False
        self.cut = False  # the list ended early (max_tokens, a stop): only its complete calls count
        self.closed_at: list[int] = []  # where in `raw` each complete call ends
        self.held: list[dict] = []  # deltas of calls not closed yet
        self.calls: list[dict] = []

    def _char(self, c: str) -> list[dict]:
        """One character after [TOOL_CALLS]: track nesting, act on call-level structure."""
        was_string = self.in_string
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
        elif c == '"':
            self.in_string = True
        elif c in "[{":
            if not self.stack and c == "{":
                self.stack.append("[")  # a lone call object, without the list
            self.stack.append(c)
            return self._at(len(self.stack) - 1, c, False)
        elif c in "]}":
            if not self.stack or "[{".index(self.stack[-1]) != "]}".index(c):
                raise ValueError("unbalanced JSON")
            self.stack.pop()
        return self._at(len(self.stack), c, was_string or self.in_string)

    def _at(self, level: int, c: str, in_str: bool) -> list[dict]:
        """`c` at nesting `level` (containers around it): 0 list, 1 call, 2+ inside a call."""
        if level == 0:
            if c == "]":
                self.done = True
            elif not (c == "[" or c.isspace()):
                raise ValueError("tool calls must be a JSON list")
            return []
        if level == 1:
            if c == "{":
                self.call, self.expect = _Call(len(self.ids)), "key"
            elif c == "}":
                return self._close_call()
            elif not (c == "," or c.isspace()):
                raise ValueError("each tool call must be an object")
            return []
        call = self.call
        if call is None:
            raise ValueError("a value outside any call")
        if level == 2 and not in_str and (c in ",:" or c.isspace()):
            if c == ":" and self.expect == "colon":
                self.expect, call.buffer = "value", ""
            elif c == "," and self.expect == "value":
                out = self._value_done(call)
                self.expect = "key"
                return out
            elif c != " " and not c.isspace():
                raise ValueError("misplaced separator")
            return []
        if self.expect == "key":
            call.buffer += c
            if level == 2 and not self.in_string and c == '"' and len(call.buffer) > 1:
                call.key, call.buffer, self.expect = json.loads(call.buffer), "", "colon"
            return []
        if self.expect != "value":
            raise ValueError("a value without a key")
        call.buffer += c
        if call.key == "arguments" and not call.buffer.startswith('"'):
            return self._arguments(call, c)
        return []

    def _value_done(self, call: _Call) -> list[dict]:
        value, call.buffer = json.loads(call.buffer), ""
        if call.key == "name":
            if not isinstance(value, str):
                raise ValueError("the name must be a string")
            call.name = value
            return self._announce(call)
        if call.key == "id":
            call.id = value
        elif call.key == "arguments" and isinstance(value, str):
            return self._arguments(call, value)
        return []

    def _arguments(self, call: _Call, piece: str) -> list[dict]:
        if call.name is None:
            call.held_args.append(piece)
            return []
        return [{"tool_calls": [{"index": call.index, "function": {"arguments": piece}}]}]

    def _announce(self, call: _Call) -> list[dict]:
        call_id = call.id if isinstance(call.id, str) and CALL_ID.match(call.id) else new_call_id()
        self.ids.append(call_id)
        out = [{"tool_calls": [{"index": call.index, "id": call_id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}}]}]
        if call.held_args:
            held, call.held_args = "".join(call.held_args), []
            out += self._arguments(call, held)
        return out

    def _close_call(self) -> list[dict]:
        call = self.call
        out = self._value_done(call) if self.expect == "value" and call.buffer else []
        if call.name is None:
            raise ValueError("a call without a name")
        self.call = None
        self.closed_at.append(len(self.raw))
        return out

    def feed(self, token: Optional[int], text: str) -> list[dict]:
        if token is not None and token == self.marker and not self.in_calls:
            self.in_calls = True
            return []
        if not self.in_calls:
            return [{"content": text}] if text else []
        for c in text:
            self.raw += c
            if self.failed or self.done:
                continue
            try:
                self.held += self._char(c)
            except (ValueError, json.JSONDecodeError):
                self.failed = True
        return self._release(len(self.closed_at))

    def _release(self, closed: int) -> list[dict]:
        """The held deltas of the first `closed` calls, one delta per call."""
        out = [d for d in self.held if d["tool_calls"][0]["index"] < closed]
        self.held = [d for d in self.held if d["tool_calls"][0]["index"] >= closed]
        return _coalesce(out)

    def finish(self) -> list[dict]:
        """The closing deltas: the raw text as content if no call could be read. A list cut
        short keeps its complete calls and drops the unfinished one (`cut`)."""
        if not self.in_calls:
            return []
        raw = self.raw
        if not self.done and not self.failed:
            self.cut = True
            if not self.closed_at:
                return []  # not even one call finished: no calls, and no raw call text either
            raw = self.raw[:self.closed_at[-1]] + "]"
            self.ids = self.ids[:len(self.closed_at)]
        calls = parse_calls_text(raw)
        if calls is None or self.failed or len(calls) != len(self.ids):
            self.failed = True  # as in `parse_reply`, malformed calls are content
            return [{"content": self.raw}] if self.raw else []
        for call, call_id in zip(calls, self.ids):
            call["id"] = call_id  # the ids the client already saw
        self.calls = calls
        return self._release(len(calls))


def _coalesce(deltas: list[dict]) -> list[dict]:
    """Joins the argument pieces of each call into the delta that announces it."""
    out: list[dict] = []
    for d in deltas:
        call = d["tool_calls"][0]
        prev = out[-1]["tool_calls"][0] if out else {}
        if set(call) == {"index", "function"} and prev.get("index") == call["index"]:
            prev["function"]["arguments"] += call["function"]["arguments"]
        else:
            out.append({"tool_calls": [dict(call, function=dict(call["function"]))]})
    return out


__all__ = ["validate_request", "call_marker", "parse_reply", "parse_calls_text", "ToolCallStream", "new_call_id"]
