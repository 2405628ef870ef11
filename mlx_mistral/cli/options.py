"""Option groups shared by the `mlx-mistral` commands, and their translation into API keywords."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import click

from ..errors import MistralError

DEFAULT_MODEL = "mistralai/Mistral-Small-24B-Instruct-2501"
SEED = click.IntRange(0, 2**64 - 1)  # a seed is an unsigned 64-bit random key


class Finite(click.FloatRange):
    """A FloatRange that also refuses nan and inf (which every comparison lets through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return value


def sampling_options(f):
    """Sampling flags shared by generate and chat."""
    options = [
        click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Most tokens to generate (capped where the model's context ends)."),
        click.option("--temp", "temperature", type=Finite(min=0), default=0.15, show_default=True,
                     help="Sampling temperature (0 = greedy; Mistral recommends 0.15)."),
        click.option("--top-p", type=Finite(0, 1, min_open=True), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off."),
        click.option("--min-p", type=Finite(0, 1), default=0.0, show_default=True),
        click.option("--repetition-penalty", type=Finite(min=0, min_open=True), default=None),
        click.option("--seed", type=SEED, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def speculation_options(f):
    """Speculative decoding flags shared by generate and chat."""
    options = [
        click.option("--speculate", type=click.Choice(["none", "lookup", "draft"]), default=None,
                     help="Speculative decoding: prompt lookup or a draft model [default: by backend]."),
        click.option("--num-draft", type=click.IntRange(min=0), default=None, help="Tokens drafted per step."),
        click.option("--draft-model", default=None, help="Draft model folder or hub id (same vocabulary)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def speculation_kwargs(kw: dict, model, tokenizer) -> dict:
    """stream_generate's speculation arguments; loads and checks the draft model."""
    speculate, draft_path = kw["speculate"], kw["draft_model"]
    if draft_path is not None and speculate is None:
        speculate = "draft"
    if speculate == "draft" and draft_path is None:
        raise MistralError("--speculate draft needs --draft-model PATH")
    if draft_path is not None and speculate != "draft":
        raise MistralError("--draft-model is only used with --speculate draft")
    draft = None
    if draft_path is not None:
        from ..engine.speculate import check_draft
        from ..load import load

        draft, draft_tokenizer = load(draft_path)
        check_draft(model, draft, tokenizer, draft_tokenizer)
    return {"speculate": speculate, "num_draft": kw["num_draft"], "draft_model": draft}


def model_option(f):
    return click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                        help="Model folder or hub id.")(f)


def structured_options(f):
    """Tool and JSON-schema flags shared by generate and chat (see the block above main)."""
    options = [
        click.option("--tools", type=click.Path(dir_okay=False), default=None,
                     help="JSON file: a list of OpenAI tool (or bare function) definitions."),
        click.option("--tool-choice", default="auto", show_default=True,
                     help="auto, none, required, or the name of a function to call."),
        click.option("--json-schema", type=click.Path(dir_okay=False), default=None,
                     help="JSON schema file the reply must follow."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def cache_options(f):
    """KV-cache flags shared by generate, chat, bench and serve (read them with `kv_options`)."""
    options = [
        click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None,
                     help="Store the KV cache quantized to this many bits (default: full precision)."),
        click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
                     help="Group size of the quantized KV cache."),
        click.option("--max-kv-size", type=click.IntRange(min=16), default=None,
                     help="Bound the KV cache to this many tokens (rotating: keeps the first 4 and the "
                          "latest); off by default."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def kv_options(kw: dict) -> dict:
    """Pops the `cache_options` values out of a command's kwargs as make_cache keywords."""
    bits, group, size = kw.pop("kv_bits"), kw.pop("kv_group_size"), kw.pop("max_kv_size")
    return dict(kv_bits=int(bits) if bits else None, kv_group_size=int(group), max_kv_size=size)


def prompt_cache_option(f):
    return click.option("--prompt-cache", "prompt_cache_file", type=click.Path(dir_okay=False), default=None,
                        help="Start from a prompt cache written by `mlx-mistral cache-prompt`.")(f)


def sampling_kwargs(kw: dict) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    out = {k: kw[k] for k in keys}
    out["stop"] = list(kw["stop"])
    return out


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text of `data`, or one line saying where it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MistralError(f"{where} is not valid UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def argument_text(text: Optional[str], where: str) -> Optional[str]:
    """A command-line string checked for bytes that were not UTF-8 (Python keeps them as
    surrogates, which fail later, deep in the tokenizer)."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MistralError(f"{where} is not valid UTF-8 text") from None
    return text


def read_text(path: str, what: str) -> str:
    """A text file's contents ('-' reads stdin) as UTF-8, or one line saying what is wrong."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise MistralError(f"cannot read {what} {path}: {e.strerror}") from None
    return decode_text(data, f"{what} {'(stdin)' if path == '-' else path}")


def read_json(path: str, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MistralError(f"cannot read {what} {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MistralError(f"{what} {path} is not valid JSON: {e}") from None


def structured_kwargs(tools_path, tool_choice, schema_path) -> dict:
    """--tools / --tool-choice / --json-schema as keywords for the chat API ({} when unused)."""
    out: dict = {}
    if tools_path:
        tools = read_json(tools_path, "tools file")
        if isinstance(tools, dict):
            tools = tools.get("tools", [tools])
        if not isinstance(tools, list) or not tools:
            raise MistralError(f"tools file {tools_path} must hold a non-empty JSON list of tool definitions")
        # a bare function definition {"name", "parameters"} is wrapped as OpenAI does
        out["tools"] = [t if isinstance(t, dict) and "function" in t else {"type": "function", "function": t}
                        for t in tools]
    if tool_choice != "auto":
        if "tools" not in out:
            raise MistralError("--tool-choice needs --tools")
        out["tool_choice"] = tool_choice
    if schema_path:
        schema = read_json(schema_path, "JSON schema")
        if not isinstance(schema, dict):
            raise MistralError(f"JSON schema {schema_path} must be a JSON object")
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    return out


