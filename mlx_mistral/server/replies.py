"""Turning the generated reply into OpenAI's `content`, `tool_calls` and `finish_reason`.

The parsing is tools.py's `ToolCallStream` (the split is made on the [TOOL_CALLS] id, never on
text); this adds what the server needs around it: the deltas of a streamed reply and, for a
whole reply, the same pieces put together. Both read the stop-filtered text the generator
yields, so a stop sequence cuts the reply the same way in either shape. Below it, the response
shapes: one JSON body, or server-sent chunks ending in `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator, Optional, Union

from fastapi.responses import Response, StreamingResponse

from ..generate import Response as Piece
from ..tools import ToolCallStream, call_marker
from .errors import OpenAIError
from .worker import Failed, Finished


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
        """(closing deltas, finish reason): "tool_calls" when the reply made its calls; a call
        list that did not parse (possible only unconstrained) comes out as content; one cut
        short keeps its complete calls and the engine's reason ("length")."""
        deltas = self._collect(self.calls.finish())
        return deltas, "tool_calls" if self.calls.calls and not self.calls.cut else finish_reason

    def message(self) -> dict:
        """The whole reply (after `finish`) as {"role", "content", "tool_calls"?}."""
        content = "".join(self.content)
        if not self.calls.calls:
            return {"role": "assistant", "content": content}
        return {"role": "assistant", "content": content.strip() or None, "tool_calls": self.calls.calls}


class Logprobs:
    """The log-probabilities of a reply's tokens, gathered from its pieces, in OpenAI's shapes."""

    def __init__(self, tokenizer, wanted: bool):
        self.tokenizer, self.wanted = tokenizer, wanted
        self.entries: list[dict] = []
        self.taken = 0  # entries already sent in a stream chunk

    def _token(self, token: int) -> dict:
        piece = token_bytes(self.tokenizer, token)
        return {"token": piece.decode("utf-8", errors="replace"), "bytes": list(piece)}

    def add(self, piece: Piece) -> None:
        if self.wanted and piece.token is not None and piece.logprob is not None:
            top = [dict(self._token(t), logprob=lp) for t, lp in piece.top_logprobs or []]
            self.entries.append(dict(self._token(piece.token), logprob=piece.logprob, top_logprobs=top))

    def chat(self, new_only: bool = False) -> Optional[dict]:
        """{"content": [...]} (the entries not yet sent, when streaming), or None if not asked."""
        if not self.wanted:
            return None
        start, self.taken = (self.taken if new_only else 0), len(self.entries)
        return {"content": self.entries[start:]}

    def completion(self, offset: int = 0, new_only: bool = False) -> Optional[dict]:
        """The legacy completions shape; `offset` is where these entries' text starts."""
        if not self.wanted:
            return None
        start, self.taken = (self.taken if new_only else 0), len(self.entries)
        before = ""
        tokens, offsets = [], []
        for e in self.entries[start:]:
            offsets.append(offset + len(before))
            tokens.append(e["token"])
            before += e["token"]
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in self.entries[start:]],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in self.entries[start:]],
                "text_offset": offsets}


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes of one token: a Tekken piece may be part of a UTF-8 character."""
    tekken = getattr(tokenizer, "tekken", None)
    if tekken is None:
        return tokenizer.decode([token]).encode()
    from mistral_common.tokens.tokenizers.tekken import SpecialTokenPolicy

    return tekken.id_to_byte_piece(token, SpecialTokenPolicy.KEEP)


# -- response shapes ------------------------------------------------------------------------------

class Meta:
    """id, creation time and model name shared by every chunk of one response."""

    def __init__(self, prefix: str, model_id: str):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_id

    def body(self, obj: str, choices: list, usage: Optional[dict] = None, with_usage: bool = True) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if with_usage:
            out["usage"] = usage
        return out


def usage(done: Union[Finished, list[Finished]]) -> dict:
    """One request's usage; with n replies, the prompt counts once and the completions add up."""
    done = done if isinstance(done, list) else [done]
    completion = sum(d.completion_tokens for d in done)
    return {"prompt_tokens": done[0].prompt_tokens, "completion_tokens": completion,
            "total_tokens": done[0].prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": done[0].cached_tokens}}


def client_gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def chat_chunks(events, meta: Meta, replies: list[ReplyAssembler], include_usage: bool,
                      logprobs: list[Logprobs]) -> AsyncIterator[dict]:
    """Chunks of n replies; each chunk's choice carries its reply's index."""
    def chunk(i: int, delta: dict, finish_reason: Optional[str] = None) -> dict:
        # a chunk carries the logprobs of the tokens since the one before it
        choice = {"index": i, "delta": delta, "finish_reason": finish_reason,
                  "logprobs": logprobs[i].chat(new_only=True) if delta or finish_reason else None}
        return meta.body("chat.completion.chunk", [choice], None, with_usage=include_usage)

    for i in range(len(replies)):
        yield chunk(i, {"role": "assistant", "content": ""})
    done: list[Finished] = []
    async for event in events:
        if isinstance(event, Piece):
            logprobs[event.index].add(event)
            for delta in replies[event.index].feed(event.text, event.token):
                yield chunk(event.index, delta)
        elif isinstance(event, Finished):
            deltas, finish_reason = replies[event.index].finish(event.finish_reason)
            for delta in deltas:
                yield chunk(event.index, delta)
            yield chunk(event.index, {}, finish_reason)
            done.append(event)
            if include_usage and len(done) == len(replies):
                yield meta.body("chat.completion.chunk", [], usage(done))
        elif isinstance(event, Failed):
            yield OpenAIError(500, event.message, type="server_error").body()


async def completion_chunks(events, meta: Meta, include_usage: bool, logprobs: list[Logprobs],
                            echo: str = "") -> AsyncIterator[dict]:
    """Chunks of n replies; each chunk's choice carries its reply's index."""
    sent = [len(echo)] * len(logprobs)  # characters streamed per reply: where its next tokens start

    def chunk(i: int, text: str, finish_reason: Optional[str] = None) -> dict:
        choice = {"index": i, "text": text, "finish_reason": finish_reason,
                  "logprobs": logprobs[i].completion(sent[i], new_only=True)}
        sent[i] += len(text)
        return meta.body("text_completion", [choice], None, with_usage=include_usage)

    for i in range(len(logprobs) if echo else 0):
        yield meta.body("text_completion", [{"index": i, "text": echo, "finish_reason": None, "logprobs": None}],
                        None, with_usage=include_usage)
    done: list[Finished] = []
    async for event in events:
        if isinstance(event, Piece):
            logprobs[event.index].add(event)
        if isinstance(event, Piece) and event.text:
            yield chunk(event.index, event.text)
        elif isinstance(event, Finished):
            yield chunk(event.index, "", event.finish_reason)
            done.append(event)
            if include_usage and len(done) == len(logprobs):
                yield meta.body("text_completion", [], usage(done))
        elif isinstance(event, Failed):
            yield OpenAIError(500, event.message, type="server_error").body()
