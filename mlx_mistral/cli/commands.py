"""`mlx-mistral` command line: thin wrappers over the Python API."""

from __future__ import annotations

import json
import sys
from typing import Optional

import click

from . import __version__
from .cli_options import (
    cache_options, kv_options, model_option, prompt_cache_option, sampling_kwargs, sampling_options,
    speculation_kwargs, speculation_options, structured_kwargs, structured_options,
)
from .errors import MistralError



class Group(click.Group):
    """Turns a MistralError anywhere below into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MistralError as e:
            raise click.ClickException(str(e)) from None



@click.group(cls=Group)
@click.version_option(__version__, prog_name="mlx-mistral")
def cli():
    """Run Mistral Small 3 with MLX."""


@cli.command()
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
    from .generate import stream_generate

    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise MistralError("no prompt: pass -p TEXT or pipe text on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise MistralError("the prompt is empty")
    structured = structured_kwargs(tools, tool_choice, json_schema)
    kv = kv_options(kw)
    # bytes bound the token count from above: enough for the memory check before loading
    context = len(prompt.encode()) + len((system or "").encode()) + kw["max_tokens"] + 64
    m, tokenizer, cached = _load_with_prompt_cache(model, prompt_cache_file, context, kv)
    request, extra = prompt, kv
    if cached:
        cached.system = system or cached.system
        request, extra = cached.messages(prompt), dict(kv, prompt_cache=cached.conversation, tools=cached.tools)
    if structured:
        if not cached:
            request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        options = {**extra, **structured, **speculation_kwargs(kw, m, tokenizer)}
        return _generate_structured(m, tokenizer, request, options, sampling_kwargs(kw), verbose)
    last = None
    for last in stream_generate(m, tokenizer, request, system=system, **extra, **sampling_kwargs(kw),
                                **speculation_kwargs(kw, m, tokenizer)):
        click.echo(last.text, nl=False)
    click.echo()
    if verbose and last is not None:
        from .load import runtime_summary

        _report(last, err=True)
        if last.speculation is not None:
            click.echo(last.speculation.summary(), err=True)
        click.echo(runtime_summary(m, kv.get("kv_bits"), kv.get("max_kv_size")), err=True)


def _load_with_prompt_cache(model: str, prompt_cache_file: Optional[str], context: int, kv: dict):
    """(model, tokenizer, PromptCacheFile or None); the memory check counts the cached prefix."""
    from .load import load
    from .prompt_cache import load_prompt_cache_file, peek_prompt_cache

    if not prompt_cache_file:
        return (*load(model, context=context, **kv), None)
    prefix = len(json.loads(peek_prompt_cache(prompt_cache_file)["tokens"]))
    m, tokenizer = load(model, context=context + prefix, **kv)
    return m, tokenizer, load_prompt_cache_file(prompt_cache_file, m, **kv)


def _report(r, err: bool = False) -> None:
    click.echo(
        f"prompt: {r.prompt_tokens} tokens ({r.cached_tokens} cached), {r.prompt_tps:.2f} tokens/s | "
        f"decode: {r.generation_tokens} tokens, {r.generation_tps:.2f} tokens/s | "
        f"peak memory: {r.peak_memory_gb:.2f} GB",
        err=err,
    )


@cli.command()
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
    from .cache import ConversationCache
    from .chat_repl import ChatSession
    from .load import read_config, resolve

    structured = structured_kwargs(tools, tool_choice, json_schema)
    kv = kv_options(kw)
    folder = resolve(model)  # once: for a hub id this asks the hub (and may convert)
    if context is None:
        context = read_config(folder).get("max_position_embeddings", 32768)
    m, tokenizer, cached = _load_with_prompt_cache(str(folder), prompt_cache_file, context, kv)
    conversation = cached.conversation if cached else ConversationCache(m, **kv)
    if cached and cached.tools and "tools" not in structured:
        structured["tools"] = cached.tools
    sampling = {**sampling_kwargs(kw), **speculation_kwargs(kw, m, tokenizer)}
    ChatSession(m, tokenizer, system=system or (cached.system if cached else None), sampling=sampling,
                cache=conversation, document=cached.document if cached else None, **structured).run()


@cli.command()
@click.argument("out", type=click.Path())
@click.option("--preset", type=click.Choice(["tiny", "small", "mistral-small-3"]), default="tiny", show_default=True)
@click.option("--quantize", "bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Write the weights already quantized (MLX affine) with this many bits.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def synth(out, preset, bits, group_size, seed, force):
    """Write a random-weight checkpoint of a Mistral Small 3 shape to OUT."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .synth import PRESETS, tensor_shapes, synth as run_synth
    from .config import ModelArgs

    total = sum(1 for _ in tensor_shapes(ModelArgs.from_dict(PRESETS[preset])))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("generating tensors", total=total)
        path = run_synth(out, preset, bits=int(bits) if bits else None, group_size=int(group_size),
                         seed=seed, force=force, progress=lambda name, n: progress.advance(task))
    click.echo(f"wrote {preset} checkpoint to {path}")


@cli.command("convert")
@click.argument("src")
@click.argument("out", type=click.Path())
@click.option("--bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4", show_default=True,
              help="Quantization width (MLX affine).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Weights sharing one scale and bias.")
@click.option("--no-quantize", is_flag=True, help="Keep full precision (in --dtype).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Dtype of unquantized tensors, scales and biases.")
@click.option("--recipe", type=click.Choice(["uniform", "mixed"]), default="uniform", show_default=True,
              help="mixed: embedding, head and the sensitive v_proj/down_proj at 6 bits.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def convert_cmd(src, out, bits, group_size, no_quantize, dtype, recipe, force):
    """Convert a checkpoint (HF or consolidated folder, or hub id) SRC into the MLX folder OUT."""
    from .convert.pipeline import RichProgress, convert

    with RichProgress() as progress:
        r = convert(src, out, bits=int(bits), group_size=int(group_size), quantize=not no_quantize,
                    dtype=dtype, recipe=recipe, force=force, progress=progress)
    what = "unquantized" if no_quantize else f"{r.bits_per_weight:.2f} bits per weight"
    click.echo(f"wrote {r.out}: {r.tensors} tensors from the {r.source.layout} checkpoint, "
               f"{r.nbytes / 1e6:,.0f} MB in {r.shards} shard(s), {what}")


def _generate_structured(model, tokenizer, messages, structured: dict, sampling: dict, verbose: bool) -> None:
    """Streams text; tool calls are printed at the end as an OpenAI `tool_calls` JSON list."""
    from .generate import stream_chat_completion
    from .tools import merge_call_deltas

    calls: dict = {}
    last = None
    for last in stream_chat_completion(model, tokenizer, messages, **structured, **sampling):
        delta = last["delta"]
        click.echo(delta.get("content", ""), nl=False)
        merge_call_deltas(calls, delta.get("tool_calls", []))
    if calls and last["finish_reason"] == "tool_calls":
        click.echo(json.dumps([calls[i] for i in sorted(calls)], indent=2, ensure_ascii=False), nl=False)
    click.echo()
    if verbose:
        usage, timing = last["usage"], last["timing"]
        click.echo(f"finish: {last['finish_reason']} | prompt: {usage['prompt_tokens']} tokens, "
                   f"{timing['prompt_tps']:.2f} tokens/s | decode: {usage['completion_tokens']} tokens, "
                   f"{timing['generation_tps']:.2f} tokens/s | peak memory: {timing['peak_memory_gb']:.2f} GB",
                   err=True)


@cli.command()
@model_option
@click.option("--context", type=click.IntRange(min=0), default=None,
              help="Tokens of context to plan for (default: the model's maximum).")
@cache_options
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Plan for this compute dtype (default: this runtime's). 16-bit plans for a GPU "
                   "(a Mac: fused attention), float32 for MLX's CPU backend.")
@click.option("--budget-gb", type=click.FloatRange(min=0.1), default=None,
              help="Plan for this much memory instead of this machine's budget.")
def info(model, context, dtype, budget_gb, **kw):
    """Memory plan from config.json alone: weights, KV per token and at --context, budget."""
    from rich.console import Console

    from . import memory
    from .load import config_only

    config, on_disk = config_only(model)
    if context is None:
        context = config.get("max_position_embeddings", 32768)
    p = memory.plan(config, context=context, dtype_bytes=memory.DTYPE_BYTES[dtype] if dtype else None,
                    fused_attention=dtype in ("float16", "bfloat16") if dtype else None, **kv_options(kw))
    budget = memory.machine_budget()
    if budget_gb is not None:
        budget = memory.Budget(int(budget_gb * 1e9), budget.ram, "--budget-gb")
    Console().print(memory.plan_table(p, budget, title=str(model), on_disk=on_disk))


@cli.command("cache-prompt")
@model_option
@click.option("--system", default=None, help="System prompt to cache.")
@click.option("--prompt-file", type=click.File("r"), default=None,
              help="A document every request starts with (its text opens the first user message).")
@click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None, help="Quantize the cached KV.")
@click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.argument("out", type=click.Path(dir_okay=False))
def cache_prompt_command(model, system, prompt_file, kv_bits, kv_group_size, out):
    """Save the KV of a fixed prefix (system prompt, document) to OUT for --prompt-cache."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .load import load
    from .prompt_cache import cache_prompt

    document = prompt_file.read() if prompt_file else None
    kv = dict(kv_bits=int(kv_bits) if kv_bits else None, kv_group_size=int(kv_group_size))
    context = len((system or "").encode()) + len((document or "").encode()) + 64
    m, tokenizer = load(model, context=context, **kv)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("prefilling the prefix", total=None)
        path = cache_prompt(m, tokenizer, out, system=system, document=document, **kv,
                            progress=lambda done, total: progress.update(task, completed=done, total=total))
    click.echo(f"wrote the prompt cache to {path}")

@cli.command()
@model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="MLX_MISTRAL_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(min=1), default=None,
              help="Reply length for requests that set none (default: up to the context length).")
@click.option("--drain-timeout", default=30.0, show_default=True,
              help="Seconds that in-flight requests get to finish on Ctrl-C / SIGTERM.")
def serve(model, host, port, api_key, default_max_tokens, drain_timeout):
    """OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models."""
    from .server import serve as run_server

    run_server(model, host=host, port=port, api_key=api_key, default_max_tokens=default_max_tokens,
               drain_timeout=drain_timeout)

@cli.command()
@model_option
@click.option("--prompt-tokens", "-p", type=click.IntRange(min=1), default=512, show_default=True,
              help="Random prompt length.")
@click.option("--generation-tokens", "-g", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens to generate (end of sequence ignored).")
@click.option("--num-trials", "-n", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed trials after the warm-up.")
@click.option("--prefill-step", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Prompt tokens per prefill chunk.")
@click.option("--peak-gbps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="The machine's peak memory bandwidth (default: known Apple chip, else measured).")
@click.option("--no-warmup", is_flag=True, help="Skip the short warm-up run.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def bench(model, prompt_tokens, generation_tokens, num_trials, prefill_step, peak_gbps, no_warmup,
          seed, as_json):
    """Measure prefill and decode speed, time to first token, memory and bandwidth."""
    from rich.console import Console

    from .bench import BenchConfig, benchmark, peak_bandwidth
    from .bench_view import live_progress, result_header, result_table
    from .generate import generate_step
    from .load import load_model, resolve

    folder = resolve(model)
    console = Console(stderr=True)
    with console.status(f"loading {folder.name}"):
        m = load_model(folder)
    config = BenchConfig(prompt_tokens, generation_tokens, num_trials, prefill_step, not no_warmup, seed)
    with console.status("measuring peak memory bandwidth"):
        peak = peak_bandwidth(peak_gbps)
    with live_progress("mlx-mistral", num_trials, console) as listener:
        result = benchmark(generate_step, m, model_name=folder.name, runtime="mlx-mistral",
                           vocab_size=m.args.vocab_size, config=config, peak=peak, listener=listener)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        out = Console()
        out.print(result_header(result))
        out.print(result_table(result))


def main(argv: Optional[list[str]] = None) -> None:
    cli.main(args=argv, prog_name="mlx-mistral")


if __name__ == "__main__":
    main()
