"""POST /v1/responses: OpenAI's Responses API, its stateless core, over the chat pipeline.

A request's `input` (a string, or message / function_call / function_call_output items),
`instructions`, function `tools`, `tool_choice`, `text.format` and `max_output_tokens` become a
`ChatRequest`; the reply's content and tool calls become output items (`message`,
`function_call`), as one `response` object or as the documented event stream. A reply's
conversation is kept (a bounded map on app.state) so `previous_response_id` continues it; the
engine's prefix pool then reuses the KV of the turn before.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, ValidationError

from ..generate import Response as Piece
from .errors import OpenAIError
from .replies import ReplyAssembler, client_gone
from .routes import guarded, prepare_chat, run
from .schemas import ChatRequest, _Model
from .worker import Failed, Finished

KEPT_RESPONSES = 256  # conversations kept for previous_response_id; the oldest goes first

router = APIRouter()


class ResponsesRequest(_Model):
    model: Optional[str] = None
    input: Union[str, list[dict]]
    instructions: Optional[str] = None
    tools: Optional[list[dict]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[dict] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    previous_response_id: Optional[str] = None
    stream: bool = False


class ConversationStore:
    """Response id -> the chat messages of its whole conversation, the newest KEPT_RESPONSES."""

    def __init__(self, size: int = KEPT_RESPONSES):
        self.size, self.kept = size, OrderedDict()

    def get(self, response_id: str) -> list[dict]:
        if response_id not in self.kept:
            raise OpenAIError(400, f"Previous response with id '{response_id}' not found (this server keeps "
                              f"the last {self.size}).", param="previous_response_id")
        return [dict(m) for m in self.kept[response_id]]

    def put(self, response_id: str, messages: list[dict]) -> None:
        self.kept[response_id] = messages
        while len(self.kept) > self.size:
            self.kept.popitem(last=False)


# -- request: items to chat messages ----------------------------------------------------------------

def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = content or []
    for part in parts:
        if part.get("type") not in ("input_text", "output_text", "text"):
            raise OpenAIError(400, f"content parts of type {part.get('type')!r} are not supported (text only)",
                              param="input")
    return "".join(part.get("text", "") for part in parts)


def input_messages(items: Union[str, list[dict]]) -> list[dict]:
    """Responses input items as OpenAI chat messages; consecutive calls join one assistant turn."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": _text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind != "reasoning":  # a reasoning item from another model carries nothing to say
            raise OpenAIError(400, f"input items of type {kind!r} are not supported", param="input")
    return messages


def chat_tools(tools: Optional[list[dict]]) -> Optional[list[dict]]:
    out = []
    for tool in tools or []:
        if tool.get("type") != "function":
            raise OpenAIError(400, f"tools of type {tool.get('type')!r} are not supported (function only)",
                              param="tools")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                          "strict") if tool.get(k) is not None}})
    return out or None


def chat_format(text: Optional[dict]) -> Optional[dict]:
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") in ("text", "json_object"):
        return fmt
    if fmt.get("type") != "json_schema":
        raise OpenAIError(400, f"text.format of type {fmt.get('type')!r} is not supported", param="text.format")
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema", "strict")
                                                   if fmt.get(k) is not None}}


def chat_request(body: ResponsesRequest, history: list[dict]) -> ChatRequest:
    """The ChatRequest of a Responses request; its messages are `history` + the new input."""
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    choice = body.tool_choice
    if isinstance(choice, dict):
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    try:
        return ChatRequest.model_validate(dict(
            model=body.model, messages=system + history + input_messages(body.input), tools=chat_tools(body.tools),
            tool_choice=choice, parallel_tool_calls=body.parallel_tool_calls, response_format=chat_format(body.text),
            max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p))
    except ValidationError as e:
        first = e.errors()[0]
        raise OpenAIError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", param="input") from None


# -- reply: output items ----------------------------------------------------------------------------

def message_item(text: str, status: str = "completed", item_id: Optional[str] = None) -> dict:
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text else []}


def call_item(call: dict) -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}


class ResponseShape:
    """The `response` object around the output items, with its settings and usage."""

    def __init__(self, body: ResponsesRequest, model_id: str):
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.body, self.model = body, model_id

    def object(self, status: str, output: list[dict], done: Optional[Finished] = None) -> dict:
        body = self.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        usage = None if done is None else {
            "input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "input_tokens_details": {"cached_tokens": done.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0}}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": output, "usage": usage, "error": None,
                "incomplete_details": incomplete, "instructions": body.instructions, "tools": body.tools or [],
                "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls is not False,
                "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
                "previous_response_id": body.previous_response_id, "text": body.text or {"format": {"type": "text"}},
                "metadata": {}, "store": True, "truncation": "disabled", "reasoning": None}


def status_of(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def reply_messages(reply: ReplyAssembler) -> list[dict]:
    """The reply as chat messages, for the conversation kept under its response id."""
    return [reply.message()]


# -- the event stream -------------------------------------------------------------------------------

class EventStream:
    """Turns reply deltas into Responses stream events (each with its sequence number)."""

    def __init__(self, shape: ResponseShape):
        self.shape, self.seq = shape, 0
        self.output: list[dict] = []
        self.text: Optional[dict] = None  # the open message item
        self.parts: list[str] = []

    def event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def open_text(self) -> list[dict]:
        item = message_item("", "in_progress")
        self.text, index = item, len(self.output)
        self.output.append(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self.event("response.output_item.added", output_index=index, item=item),
                self.event("response.content_part.added", item_id=item["id"], output_index=index,
                           content_index=0, part=part)]

    def close_text(self) -> list[dict]:
        if self.text is None:
            return []
        text, index = "".join(self.parts), self.output.index(self.text)
        item = self.output[index] = message_item(text, item_id=self.text["id"])
        item["content"] = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        self.text = None
        return [self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=item["content"][0]),
                self.event("response.output_item.done", output_index=index, item=item)]

    def content(self, piece: str) -> list[dict]:
        out = self.open_text() if self.text is None else []
        self.parts.append(piece)
        return out + [self.event("response.output_text.delta", item_id=self.text["id"],
                                 output_index=len(self.output) - 1, content_index=0, delta=piece, logprobs=[])]

    def call(self, call: dict) -> list[dict]:
        """A whole call (the assembler sends each call once it is complete)."""
        out = self.close_text()
        item, index = call_item(call), len(self.output)
        self.output.append(item)
        return out + [
            self.event("response.output_item.added", output_index=index, item=dict(item, arguments="",
                                                                                    status="in_progress")),
            self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                       delta=item["arguments"]),
            self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       arguments=item["arguments"]),
            self.event("response.output_item.done", output_index=index, item=item)]

    def deltas(self, deltas: list[dict]) -> list[dict]:
        out = []
        for delta in deltas:
            if delta.get("content"):
                out += self.content(delta["content"])
            for piece in delta.get("tool_calls", []):
                out += self.call({"id": piece["id"], "function": piece["function"]})
        return out


def sse_events(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        async for event in events:
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def stream_response(events, shape: ResponseShape, reply: ReplyAssembler, keep) -> AsyncIterator[dict]:
    stream = EventStream(shape)
    yield stream.event("response.created", response=shape.object("in_progress", []))
    yield stream.event("response.in_progress", response=shape.object("in_progress", []))
    async for event in events:
        if isinstance(event, Piece):
            for e in stream.deltas(reply.feed(event.text, event.token)):
                yield e
        elif isinstance(event, Finished):
            deltas, finish_reason = reply.finish(event.finish_reason)
            for e in stream.deltas(deltas) + stream.close_text():
                yield e
            keep(reply)
            status = status_of(finish_reason)
            kind = "response.completed" if status == "completed" else "response.incomplete"
            yield stream.event(kind, response=shape.object(status, stream.output, event))
        elif isinstance(event, Failed):
            failed = dict(shape.object("failed", stream.output), error={"code": "server_error",
                                                                       "message": event.message})
            yield stream.event("response.failed", response=failed)


# -- the endpoint -----------------------------------------------------------------------------------

def output_items(reply: ReplyAssembler) -> list[dict]:
    message = reply.message()
    text = [message_item(message["content"])] if message.get("content") else []
    return text + [call_item(c) for c in message.get("tool_calls", [])]


@router.post("/v1/responses", dependencies=guarded)
async def create_response(body: ResponsesRequest, request: Request):
    state = request.app.state
    store: ConversationStore = state.responses
    history = store.get(body.previous_response_id) if body.previous_response_id else []
    chat = chat_request(body, history)
    ids, params = await prepare_chat(chat, request)
    shape = ResponseShape(body, state.settings.model_id)
    # the instructions are not carried into the next turn (as OpenAI does), the rest is
    conversation = [m.to_openai() for m in chat.messages[1 if body.instructions else 0:]]

    def keep(reply: ReplyAssembler) -> None:
        store.put(shape.id, conversation + reply_messages(reply))

    events = run(request, ids, params)
    reply = ReplyAssembler(state.tokenizer)
    if body.stream:
        return sse_events(stream_response(events, shape, reply, keep))
    async for event in events:
        if isinstance(event, Piece):
            reply.feed(event.text, event.token)
        elif isinstance(event, Finished):
            _, finish_reason = reply.finish(event.finish_reason)
            keep(reply)
            return shape.object(status_of(finish_reason), output_items(reply), event)
        elif isinstance(event, Failed):
            raise OpenAIError(500, event.message, type="server_error")
    return client_gone()
