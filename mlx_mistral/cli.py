"""`mlx-mistral` command line: thin wrappers over the Python API."""

from __future__ import annotations

import sys
from typing import Optional

import click

from . import __version__
from .errors import MistralError

DEFAULT_MODEL = "mistralai/Mistral-Small-24B-Instruct-2501"


class Group(click.Group):
    """Turns a MistralError anywhere below into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MistralError as e:
            raise click.ClickException(str(e)) from None


def sampling_options(f):
    """Sampling flags shared by generate and chat."""
    options = [
        click.option("--max-tokens", "-n", default=512, show_default=True, help="Most tokens to generate."),
        click.option("--temp", "temperature", default=0.15, show_default=True,
                     help="Sampling temperature (0 = greedy; Mistral recommends 0.15)."),
        click.option("--top-p", default=1.0, show_default=True),
        click.option("--top-k", default=0, show_default=True, help="0 = off."),
        click.option("--min-p", default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


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


def _sampling(kw: dict) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    out = {k: kw[k] for k in keys}
    out["stop"] = list(kw["stop"])
    return out


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
@click.option("--verbose", "-v", is_flag=True, help="Print tokens/s and peak memory.")
def generate(model, prompt, system, verbose, tools, tool_choice, json_schema, **kw):
    """Generate a reply to one prompt, streamed to stdout (tool calls as a JSON list)."""
    from .generate import stream_generate
    from .load import load

    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise MistralError("no prompt: pass -p TEXT or pipe text on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise MistralError("the prompt is empty")
    structured = _structured(tools, tool_choice, json_schema)
    m, tokenizer = load(model)
    if structured:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return _generate_structured(m, tokenizer, messages, structured, _sampling(kw), verbose)
    last = None
    for last in stream_generate(m, tokenizer, prompt, system=system, **_sampling(kw)):
        click.echo(last.text, nl=False)
    click.echo()
    if verbose and last is not None:
        from .load import runtime_summary

        _report(last, err=True)
        click.echo(runtime_summary(), err=True)


def _report(r, err: bool = False) -> None:
    click.echo(
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.2f} tokens/s | "
        f"decode: {r.generation_tokens} tokens, {r.generation_tps:.2f} tokens/s | "
        f"peak memory: {r.peak_memory_gb:.2f} GB",
        err=err,
    )


@cli.command()
@model_option
@click.option("--system", default=None, help="System prompt.")
@sampling_options
@structured_options
def chat(model, system, tools, tool_choice, json_schema, **kw):
    """Interactive chat. /reset, /system TEXT, /result JSON, /quit; end a line with \\ to continue it."""
    from .chat_repl import ChatSession
    from .load import load

    structured = _structured(tools, tool_choice, json_schema)
    m, tokenizer = load(model)
    ChatSession(m, tokenizer, system=system, sampling=_sampling(kw), **structured).run()


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

# ---- tools and structured output: file loading and the generate path for --tools / --json-schema

def _read_json(path: str, what: str):
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MistralError(f"cannot read {what} {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MistralError(f"{what} {path} is not valid JSON: {e}") from None


def _structured(tools_path, tool_choice, schema_path) -> dict:
    """--tools / --tool-choice / --json-schema as keywords for the chat API ({} when unused)."""
    out: dict = {}
    if tools_path:
        tools = _read_json(tools_path, "tools file")
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
        schema = _read_json(schema_path, "JSON schema")
        if not isinstance(schema, dict):
            raise MistralError(f"JSON schema {schema_path} must be a JSON object")
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    return out


def _generate_structured(model, tokenizer, messages, structured: dict, sampling: dict, verbose: bool) -> None:
    """Streams text; tool calls are printed at the end as an OpenAI `tool_calls` JSON list."""
    import json

    from .generate import stream_chat_completion

    calls: dict = {}
    last = None
    for last in stream_chat_completion(model, tokenizer, messages, **structured, **sampling):
        delta = last["delta"]
        click.echo(delta.get("content", ""), nl=False)
        for piece in delta.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"id": piece.get("id"), "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
            call["function"]["name"] += piece.get("function", {}).get("name", "")
            call["function"]["arguments"] += piece.get("function", {}).get("arguments", "")
    if calls and last["finish_reason"] == "tool_calls":
        click.echo(json.dumps([calls[i] for i in sorted(calls)], indent=2, ensure_ascii=False), nl=False)
    click.echo()
    if verbose:
        usage, timing = last["usage"], last["timing"]
        click.echo(f"finish: {last['finish_reason']} | prompt: {usage['prompt_tokens']} tokens, "
                   f"{timing['prompt_tps']:.2f} tokens/s | decode: {usage['completion_tokens']} tokens, "
                   f"{timing['generation_tps']:.2f} tokens/s | peak memory: {timing['peak_memory_gb']:.2f} GB",
                   err=True)


def main(argv: Optional[list[str]] = None) -> None:
    cli.main(args=argv, prog_name="mlx-mistral")


if __name__ == "__main__":
    main()
