"""The interactive chat loop behind `mlx-mistral chat`."""

from __future__ import annotations

from typing import Optional

from rich.console import Console

from .errors import MistralError
from .generate import stream_generate

HELP = ("/reset clears the conversation, /system TEXT sets the system prompt, /quit leaves; "
        "end a line with \\ to continue on the next, or wrap a block in \"\"\".")


class ChatSession:
    def __init__(self, model, tokenizer, *, system: Optional[str] = None, sampling: Optional[dict] = None,
                 console: Optional[Console] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.sampling = sampling or {}
        self.console = console or Console(highlight=False)
        self.messages: list[dict] = []

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
            self.messages = []
            self.console.print("[dim]conversation cleared[/]")
        elif name == "/system":
            self.system = arg.strip() or None
            self.messages = []
            self.console.print(f"[dim]system prompt {'set' if self.system else 'cleared'}; conversation cleared[/]")
        else:
            self.console.print(f"[dim]{HELP}[/]")
        return True

    def reply(self, user_text: str) -> None:
        messages = self.messages + [{"role": "user", "content": user_text}]
        pieces, last = [], None
        try:
            for last in stream_generate(self.model, self.tokenizer, messages, system=self.system, **self.sampling):
                pieces.append(last.text)
                self.console.print(last.text, end="", markup=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            self.console.print("\n[dim](stopped)[/]", end="")
        except MistralError as e:
            self.console.print(f"[red]error:[/] {e}")
            return
        self.console.print()
        self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]
        if last is not None:
            self.console.print(
                f"[dim]{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s "
                f"(prompt {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s)[/]"
            )
            if last.speculation is not None:
                self.console.print(f"[dim]{last.speculation.summary()}[/]")

    def run(self) -> None:
        self.console.print(f"[dim]{HELP}[/]")
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
