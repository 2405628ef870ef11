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


def _speculation(kw: dict, model, tokenizer) -> dict:
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
        from .load import load
        from .speculate import check_draft

        draft, draft_tokenizer = load(draft_path)
        check_draft(model, draft, tokenizer, draft_tokenizer)
    return {"speculate": speculate, "num_draft": kw["num_draft"], "draft_model": draft}


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
@speculation_options
@click.option("--verbose", "-v", is_flag=True, help="Print tokens/s, peak memory and speculation.")
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
    for last in stream_generate(m, tokenizer, prompt, system=system, **_sampling(kw),
                                **_speculation(kw, m, tokenizer)):
        click.echo(last.text, nl=False)
    click.echo()
    if verbose and last is not None:
        from .load import runtime_summary

        _report(last, err=True)
        if last.speculation is not None:
            click.echo(last.speculation.summary(), err=True)
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
@speculation_options
def chat(model, system, **kw):
    """Interactive chat. /reset, /system TEXT, /quit; end a line with \\ to continue it."""
    from .chat_repl import ChatSession
    from .load import load

    m, tokenizer = load(model)
    sampling = {**_sampling(kw), **_speculation(kw, m, tokenizer)}
    ChatSession(m, tokenizer, system=system, sampling=sampling).run()


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


def main(argv: Optional[list[str]] = None) -> None:
    cli.main(args=argv, prog_name="mlx-mistral")


if __name__ == "__main__":
    main()
