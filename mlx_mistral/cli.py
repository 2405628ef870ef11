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
@click.option("--verbose", "-v", is_flag=True, help="Print tokens/s and peak memory.")
def generate(model, prompt, system, verbose, **kw):
    """Generate a reply to one prompt, streamed to stdout."""
    from .generate import stream_generate
    from .load import load

    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise MistralError("no prompt: pass -p TEXT or pipe text on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise MistralError("the prompt is empty")
    m, tokenizer = load(model)
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
def chat(model, system, **kw):
    """Interactive chat. /reset, /system TEXT, /quit; end a line with \\ to continue it."""
    from .chat_repl import ChatSession
    from .load import load

    m, tokenizer = load(model)
    ChatSession(m, tokenizer, system=system, sampling=_sampling(kw)).run()


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
    import json

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
