"""The interactive chat loop behind `mlx-mistral chat`."""

from __future__ import annotations

import json
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.syntax import Syntax

from ..cache import ConversationCache
from ..errors import MistralError
from ..generate import stream_chat_completion
from ..prompt_cache import DOCUMENT_SEPARATOR
from ..tools import merge_call_deltas

HELP = ("/reset clears the conversation, /system TEXT sets the system prompt, /quit leaves; "
        "end a line with \\ to continue on the next, or wrap a block in \"\"\".")
TOOLS_HELP = "/result JSON answers the oldest unanswered tool call (shown in a panel)."


class ChatSession:
    def __init__(self, model, tokenizer, *, system: Optional[str] = None, sampling: Optional[dict] = None,
                 console: Optional[Console] = None, tools: Optional[list[dict]] = None,
                 tool_choice="auto", response_format: Optional[dict] = None,
                 cache: Optional[ConversationCache] = None, document: Optional[str] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.sampling = sampling or {}
        self.console = console or Console(highlight=False)
        self.messages: list[dict] = []
        self.tools = tools
        self.tool_choice = tool_choice
        self.response_format = response_format
        self.pending: list[str] = []  # ids of tool calls still waiting for /result
        # the KV of the conversation so far: each turn computes only its new tokens
        self.cache = cache if cache is not None else ConversationCache(model)
        self.document = document  # opens the first user message (from a prompt cache file)
        self.notes: list[str] = []  # said once, when the session starts (a loaded prompt cache...)

    def read_message(self) -> Optional[str]:
        """One user message (possibly several lines); None at end of input."""
        try:
            line = self.console.input("[bold green]>>> [/]")
        except EOFError:
            return None
        if line.strip() == '"""':
            lines = []
            while True:
                try:
                    more = self.console.input("[dim]... [/]")
                except EOFError:
                    break
                if more.strip() == '"""':
                    break
                lines.append(more)
            return "\n".join(lines)
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            try:
                lines.append(self.console.input("[dim]... [/]"))
            except EOFError:
                break
        return "\n".join(lines)

    def command(self, text: str) -> bool:
        """Handle a /command; False means leave the loop."""
        name, _, arg = text.strip().partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.messages, self.pending = [], []
            self.console.print("[dim]conversation cleared[/]")
        elif name == "/result":
            self.answer_call(arg.strip())
        elif name == "/system":
            self.system = arg.strip() or None
            self.messages, self.pending = [], []
            self.console.print(f"[dim]system prompt {'set' if self.system else 'cleared'}; conversation cleared[/]")
        else:
            self.console.print(f"[dim]{HELP} {TOOLS_HELP if self.tools else ''}[/]")
        return True

    def answer_call(self, result: str) -> None:
        """Append a tool result for the oldest open call; generate once all are answered."""
        if not self.pending:
            self.console.print("[red]error:[/] no tool call is waiting for a result")
            return
        if not result:
            self.console.print("[red]error:[/] /result needs the tool's output, e.g. /result {\"temp_c\": 21}")
            return
        call_id = self.pending.pop(0)
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
        if self.pending:
            waiting = len(self.pending)
            self.console.print(f"[dim]result for {call_id} recorded; {waiting} call{'s' if waiting > 1 else ''} "
                               f"still open (next: {self.pending[0]})[/]")
        else:
            self.console.print(f"[dim]result for {call_id} recorded; all calls answered[/]")
            # a forced choice would call again forever: after results the model may answer in text
            choice = self.tool_choice if self.tool_choice in ("auto", "none") else "auto"
            self.respond(self.messages, tool_choice=choice)

    def show_call(self, call: dict) -> None:
        try:
            body = json.dumps(json.loads(call["function"]["arguments"]), indent=2, ensure_ascii=False)
        except json.JSONDecodeError:
            body = call["function"]["arguments"]
        self.console.print(Panel(Syntax(body, "json", word_wrap=True),
                                 title=f"[bold]tool call[/] {call['function']['name']}",
                                 subtitle=f"id {call['id']} · answer with /result JSON", expand=False))

    def reply(self, user_text: str) -> None:
        if self.pending:
            self.console.print("[dim]tool calls are still open: answer them with /result JSON first[/]")
            return
        if self.document and not self.messages:
            user_text = self.document + DOCUMENT_SEPARATOR + user_text
        self.respond(self.messages + [{"role": "user", "content": user_text}])

    def respond(self, messages: list[dict], tool_choice=None) -> None:
        """Stream the assistant's reply to `messages`; tool calls are shown as panels."""
        if self.system and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": self.system}] + messages
        pieces, calls, last = [], {}, None
        stream = stream_chat_completion(
            self.model, self.tokenizer, messages, tools=self.tools, response_format=self.response_format,
            tool_choice=tool_choice or self.tool_choice, prompt_cache=self.cache, **self.sampling,
        )
        try:
            for last in stream:
                delta = last["delta"]
                if delta.get("content"):
                    pieces.append(delta["content"])
                    self.console.print(delta["content"], end="", markup=False, highlight=False, soft_wrap=True)
                merge_call_deltas(calls, delta.get("tool_calls", []))
        except KeyboardInterrupt:
            self.console.print("\n[dim](stopped)[/]", end="")
            last = None
        except MistralError as e:
            self.console.print(f"[red]error:[/] {e}")
            return
        finally:
            stream.close()  # now, not at garbage collection: the cache records what it holds
        if pieces:
            self.console.print()
        text = "".join(pieces)
        message = {"role": "assistant", "content": text or None}
        if calls and (last is None or last["finish_reason"] == "tool_calls"):
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
            for call in message["tool_calls"]:
                self.show_call(call)
            self.pending = [c["id"] for c in message["tool_calls"]]
        elif not text:
            message["content"] = ""
        self.messages = [m for m in messages if m.get("role") != "system"] + [message]
        if last is not None:
            usage, timing = last["usage"], last["timing"]
            self.console.print(
                f"[dim]{usage['completion_tokens']} tokens, {timing['generation_tps']:.1f} tokens/s "
                f"(prompt {usage['prompt_tokens']} tokens, {usage['prompt_tokens_details']['cached_tokens']} cached, "
                f"{timing['prompt_tps']:.1f} tokens/s)[/]")
            if last.get("speculation") is not None:
                self.console.print(f"[dim]{last['speculation'].summary()}[/]")

    def run(self) -> None:
        for note in self.notes:
            self.console.print(f"[dim]{escape(note)}[/]")
        self.console.print(f"[dim]{HELP} {TOOLS_HELP if self.tools else ''}[/]")
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.console.print()
                break
            if text is None:
                break
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text):
                    break
                continue
            self.reply(text)
