"""`mlx-mistral generate`, `chat`, `info` and `cache-prompt`: thin wrappers over the Python API."""

from __future__ import annotations

import json
import sys
from typing import Optional

import click

from ..errors import MistralError
from .options import (
    Finite, argument_text, cache_options, decode_text, kv_options, model_option, prompt_cache_option, read_text,
    sampling_kwargs, sampling_options, speculation_kwargs, speculation_options, structured_kwargs,
    structured_options,
)


@click.command()
@model_option
@click.option("--prompt", "-p", default=None, help="Prompt text; '-' or absent reads stdin.")
@click.option("--system", default=None, help="System prompt.")
@sampling_options
@structured_options
@cache_options
@prompt_cache_option
@speculation_options
@click.option("--verbose", "-v", is_flag=True, help="Print tokens/s, peak memory and speculation.")
def generate(model, prompt, system, verbose, tools, tool_choice, json_schema, prompt_cache_file, **kw):
    """Generate a reply to one prompt, streamed to stdout (tool calls as a JSON list)."""
    from .. import memory
    from ..generate import stream_generate
    from ..load import read_config, resolve

    prompt, system = read_prompt(prompt), argument_text(system, "--system")
    kw["stop"] = tuple(argument_text(s, "--stop") for s in kw["stop"])
    structured = structured_kwargs(tools, tool_choice, json_schema)
    kv = kv_options(kw)
    folder = resolve(model)  # once: for a hub id this asks the hub (and may convert)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    # tokens, counted with the model's tokenizer before its weights load: the memory plan and
    # the context check see what generation will (a prompt cache's prefix is added when loading)
    limit = read_config(folder).get("max_position_embeddings", 32768)  # first: a missing config is the error
    n = memory.count_prompt_tokens(folder, messages, tools=structured.get("tools"))
    if not prompt_cache_file:
        kw["max_tokens"] = fit_to_context(n, limit, kw["max_tokens"])
    m, tokenizer, cached = _load_with_prompt_cache(str(folder), prompt_cache_file, n + kw["max_tokens"], kv)
    request, extra = prompt, kv
    if cached:
        cached.system = system or cached.system
        request, extra = cached.messages(prompt), dict(kv, prompt_cache=cached.conversation, tools=cached.tools)
        messages = request
        n = memory.prompt_tokens(tokenizer, messages, tools=structured.get("tools") or cached.tools)
        kw["max_tokens"] = fit_to_context(n, limit, kw["max_tokens"])
    if structured:
        request = messages
        options = {**extra, **structured, **speculation_kwargs(kw, m, tokenizer)}
        return _generate_structured(m, tokenizer, request, options, sampling_kwargs(kw), verbose)
    last = None
    for last in stream_generate(m, tokenizer, request, system=system, **extra, **sampling_kwargs(kw),
                                **speculation_kwargs(kw, m, tokenizer)):
        click.echo(last.text, nl=False)
    click.echo()
    if verbose and last is not None:
        from ..load import runtime_summary

        _report(last, err=True)
        if last.speculation is not None:
            click.echo(last.speculation.summary(), err=True)
        click.echo(runtime_summary(m, kv.get("kv_bits"), kv.get("max_kv_size")), err=True)


def read_prompt(prompt: Optional[str]) -> str:
    """The prompt from -p, or from stdin for '-' or none, as UTF-8 text; one line if it is not."""
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise MistralError("no prompt: pass -p TEXT or pipe text on stdin")
        prompt = decode_text(sys.stdin.buffer.read(), "the prompt on stdin")
    prompt = argument_text(prompt, "the prompt (-p)")
    if not prompt.strip():
        raise MistralError("the prompt is empty")
    return prompt


def fit_to_context(n: int, limit: int, max_tokens: int) -> int:
    """max_tokens after a prompt of `n` tokens, capped where the model's context of `limit` ends
    (said on stderr); a prompt that leaves no room for a reply is refused."""
    if n >= limit:
        raise MistralError(f"the prompt is {n} tokens, but the model's context holds {limit}: no room for a reply")
    if n + max_tokens > limit:
        click.echo(f"note: -n {max_tokens} capped to {limit - n}: the prompt is {n} tokens and the "
                   f"model's context holds {limit}", err=True)
        return limit - n
    return max_tokens


def _load_with_prompt_cache(model: str, prompt_cache_file: Optional[str], context: int, kv: dict):
    """(model, tokenizer, PromptCacheFile or None); the memory check counts the cached prefix."""
    from ..load import load
    from ..prompt_cache import load_prompt_cache_file, peek_prompt_cache

    if not prompt_cache_file:
        return (*load(model, context=context, **kv), None)
    prefix = len(json.loads(peek_prompt_cache(prompt_cache_file)["tokens"]))
    m, tokenizer = load(model, context=context + prefix, **kv)
    return m, tokenizer, load_prompt_cache_file(prompt_cache_file, m, **kv)


def _report_cut(finish_reason: str, tool_choice) -> None:
    """Says on stderr that the reply hit max_tokens; a forced call left unfinished is a failure."""
    if finish_reason != "length":
        return
    forced = tool_choice not in (None, "auto", "none")
    click.echo("note: the reply was cut at --max-tokens" + ("; the unfinished tool call was dropped"
               if forced else ""), err=True)
    if forced:
        raise SystemExit(1)


def _report(r, err: bool = False) -> None:
    click.echo(
        f"prompt: {r.prompt_tokens} tokens ({r.cached_tokens} cached), {r.prompt_tps:.2f} tokens/s | "
        f"decode: {r.generation_tokens} tokens, {r.generation_tps:.2f} tokens/s | "
        f"peak memory: {r.peak_memory_gb:.2f} GB",
        err=err,
    )


@click.command()
@model_option
@click.option("--system", default=None, help="System prompt.")
@sampling_options
@structured_options
@cache_options
@prompt_cache_option
@speculation_options
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="Longest conversation to plan memory for (default: the model's maximum).")
def chat(model, system, tools, tool_choice, json_schema, prompt_cache_file, context, **kw):
    """Interactive chat. /reset, /system TEXT, /result JSON, /quit; end a line with \\ to continue it."""
    from .. import memory
    from ..cache import ConversationCache
    from ..load import read_config, resolve
    from .repl import ChatSession

    system = argument_text(system, "--system")
    kw["stop"] = tuple(argument_text(s, "--stop") for s in kw["stop"])
    structured = structured_kwargs(tools, tool_choice, json_schema)
    kv = kv_options(kw)
    folder = resolve(model)  # once: for a hub id this asks the hub (and may convert)
    # the whole conversation, in tokens: --context, or all the model accepts (a longer one is refused)
    context = memory.context_tokens(read_config(folder), context=context)
    m, tokenizer, cached = _load_with_prompt_cache(str(folder), prompt_cache_file, context, kv)
    conversation = cached.conversation if cached else ConversationCache(m, **kv)
    if cached and cached.tools and "tools" not in structured:
        structured["tools"] = cached.tools
    sampling = {**sampling_kwargs(kw), **speculation_kwargs(kw, m, tokenizer)}
    session = ChatSession(m, tokenizer, system=system or (cached.system if cached else None), sampling=sampling,
                          cache=conversation, document=cached.document if cached else None, **structured)
    if cached:
        session.notes.append(_cache_note(prompt_cache_file, cached))
    session.run()


def _cache_note(path: str, cached) -> str:
    """What a loaded prompt cache holds, said when chat starts."""
    parts = [f"{len(cached.conversation.tokens)} tokens"]
    if cached.system:
        parts.append("a system prompt")
    if cached.document:
        parts.append(f"a document of {len(cached.document):,} characters")
    if cached.tools:
        parts.append(f"{len(cached.tools)} tools")
    return f"prompt cache {path} loaded: " + ", ".join(parts)


def _generate_structured(model, tokenizer, messages, structured: dict, sampling: dict, verbose: bool) -> None:
    """Streams text; tool calls are printed at the end as an OpenAI `tool_calls` JSON list."""
    from ..generate import stream_chat_completion
    from ..tools import merge_call_deltas

    calls: dict = {}
    last = None
    for last in stream_chat_completion(model, tokenizer, messages, **structured, **sampling):
        delta = last["delta"]
        click.echo(delta.get("content", ""), nl=False)
        merge_call_deltas(calls, delta.get("tool_calls", []))
    if calls:  # only complete calls stream; a cut reply keeps those it finished
        click.echo(json.dumps([calls[i] for i in sorted(calls)], indent=2, ensure_ascii=False), nl=False)
    click.echo()
    _report_cut(last["finish_reason"], structured.get("tool_choice"))
    if verbose:
        usage, timing = last["usage"], last["timing"]
        click.echo(f"finish: {last['finish_reason']} | prompt: {usage['prompt_tokens']} tokens, "
                   f"{timing['prompt_tps']:.2f} tokens/s | decode: {usage['completion_tokens']} tokens, "
                   f"{timing['generation_tps']:.2f} tokens/s | peak memory: {timing['peak_memory_gb']:.2f} GB",
                   err=True)


@click.command()
@model_option
@click.option("--context", type=click.IntRange(min=0), default=None,
              help="Tokens of context to plan for (default: the model's maximum).")
@cache_options
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Plan for this compute dtype (default: this runtime's). 16-bit plans for a GPU "
                   "(a Mac: fused attention), float32 for MLX's CPU backend.")
@click.option("--budget-gb", type=Finite(min=0.1), default=None,
              help="Plan for this much memory instead of this machine's budget.")
def info(model, context, dtype, budget_gb, **kw):
    """Memory plan from config.json alone: weights, KV per token and at --context, budget."""
    from rich.console import Console

    from .. import memory
    from ..load import config_only

    config, on_disk = config_only(model)
    context = memory.context_tokens(config, context=context)  # past the model's context: refused
    p = memory.plan(config, context=context, dtype_bytes=memory.DTYPE_BYTES[dtype] if dtype else None,
                    fused_attention=dtype in ("float16", "bfloat16") if dtype else None, **kv_options(kw))
    budget = memory.machine_budget()
    if budget_gb is not None:
        budget = memory.Budget(int(budget_gb * 1e9), budget.ram, "--budget-gb")
    Console().print(memory.plan_table(p, budget, title=str(model), on_disk=on_disk))


@click.command("cache-prompt")
@model_option
@click.option("--system", default=None, help="System prompt to cache.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="A document every request starts with (its text opens the first user message).")
@click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None, help="Quantize the cached KV.")
@click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.argument("out", type=click.Path(dir_okay=False))
def cache_prompt_command(model, system, prompt_file, kv_bits, kv_group_size, out):
    """Save the KV of a fixed prefix (system prompt, document) to OUT for --prompt-cache."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..load import load
    from ..prompt_cache import cache_prompt

    document = read_text(prompt_file, "prompt file") if prompt_file else None
    system = argument_text(system, "--system")
    kv = dict(kv_bits=int(kv_bits) if kv_bits else None, kv_group_size=int(kv_group_size))
    context = len((system or "").encode()) + len((document or "").encode()) + 64
    m, tokenizer = load(model, context=context, **kv)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("prefilling the prefix", total=None)
        path = cache_prompt(m, tokenizer, out, system=system, document=document, **kv,
                            progress=lambda done, total: progress.update(task, completed=done, total=total))
    click.echo(f"wrote the prompt cache to {path}")
