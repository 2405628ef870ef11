"""`mlx-mistral convert` and `synth`: checkpoints in, MLX model folders out."""

from __future__ import annotations

import click


@click.command()
@click.argument("out", type=click.Path())
@click.option("--preset", type=click.Choice(["tiny", "small", "mistral-small-3"]), default="tiny", show_default=True)
@click.option("--quantize", "bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Write the weights already quantized (MLX affine) with this many bits.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def synth(out, preset, bits, group_size, seed, force):
    """Write a random-weight checkpoint of a Mistral Small 3 shape to OUT."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..synth import PRESETS, tensor_shapes, synth as run_synth
    from ..config import ModelArgs

    total = sum(1 for _ in tensor_shapes(ModelArgs.from_dict(PRESETS[preset])))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("generating tensors", total=total)
        path = run_synth(out, preset, bits=int(bits) if bits else None, group_size=int(group_size),
                         seed=seed, force=force, progress=lambda name, n: progress.advance(task))
    click.echo(f"wrote {preset} checkpoint to {path}")


@click.command("convert")
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
    from ..convert.pipeline import RichProgress, convert

    with RichProgress() as progress:
        r = convert(src, out, bits=int(bits), group_size=int(group_size), quantize=not no_quantize,
                    dtype=dtype, recipe=recipe, force=force, progress=progress)
    what = "unquantized" if no_quantize else f"{r.bits_per_weight:.2f} bits per weight"
    click.echo(f"wrote {r.out}: {r.tensors} tensors from the {r.source.layout} checkpoint, "
               f"{r.nbytes / 1e6:,.0f} MB in {r.shards} shard(s), {what}")
