"""`mlx-mistral bench`: prefill and decode speed of one model (measured by mlx_mistral.bench,
shown by bench_view.py)."""

from __future__ import annotations

import json

import click

from ..distributed import launched
from ..errors import MistralError
from .options import SEED, Finite, model_option


@click.command()
@model_option
@click.option("--prompt-tokens", "-p", type=click.IntRange(min=1), default=512, show_default=True,
              help="Random prompt length.")
@click.option("--generation-tokens", "-g", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens to generate (end of sequence ignored).")
@click.option("--num-trials", "-n", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed trials after the warm-up.")
@click.option("--prefill-step", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Prompt tokens per prefill chunk.")
@click.option("--peak-gbps", type=Finite(min=0, min_open=True), default=None,
              help="The machine's peak memory bandwidth (default: known Apple chip, else measured).")
@click.option("--no-warmup", is_flag=True, help="Skip the short warm-up run.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def bench(model, prompt_tokens, generation_tokens, num_trials, prefill_step, peak_gbps, no_warmup,
          seed, as_json):
    """Measure prefill and decode speed, time to first token, memory and bandwidth."""
    from rich.console import Console

    from ..bench import BenchConfig, benchmark, peak_bandwidth
    from ..generate import engine_generate_step
    from ..load import resolve
    from .bench_view import live_progress, result_header, result_table

    folder = resolve(model)  # under mlx.launch only rank 0 runs this: the others follow its engine
    console = Console(stderr=True)
    with console.status(f"loading {folder.name}"):
        m, ranks = _load(folder, prompt_tokens + generation_tokens)
    config = BenchConfig(prompt_tokens, generation_tokens, num_trials, prefill_step, not no_warmup, seed)
    with console.status("measuring peak memory bandwidth"):
        peak = peak_bandwidth(peak_gbps)
    runtime = "mlx-mistral" if ranks == 1 else f"mlx-mistral, {ranks} ranks"
    with live_progress(runtime, num_trials, console) as listener:
        result = benchmark(engine_generate_step, m, model_name=folder.name, runtime=runtime,
                           vocab_size=m.args.vocab_size, config=config, peak=peak, listener=listener)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        out = Console()
        out.print(result_header(result))
        out.print(result_table(result))


def _load(folder, context: int):
    """(model, ranks): the whole model, or under mlx.launch rank 0's shard (the memory plan is
    then one rank's, and every other rank steps rank 0's engine until this process exits)."""
    from .. import memory
    from ..distributed.group import world
    from ..load import load, load_model, read_config

    config = read_config(folder)
    limit = config.get("max_position_embeddings", 32768)
    if context > limit:
        raise MistralError(f"-p plus -g is {context} tokens, more than the model's context of {limit}")
    if launched() and world() is not None:
        model, _ = load(folder, context=context)
        return model, world().size()
    memory.check_fits(memory.plan(config, context=context), memory.machine_budget(), name=folder.name)
    return load_model(folder), 1
