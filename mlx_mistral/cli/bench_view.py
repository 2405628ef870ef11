"""How benchmark results look: a live rich progress display while they run, a table after."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..bench import BenchResult


@contextmanager
def live_progress(label: str, trials: int, console: Console) -> Iterator:
    """Yields a `benchmark` listener that drives one bar per phase of the current trial."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict = {}

        def listener(trial: int, phase: str, done: int, total: int) -> None:
            name = "warm-up" if trial == 0 else f"trial {trial}/{trials}"
            key = (trial, phase)
            if key not in tasks:
                for old in list(tasks):  # earlier phases are finished
                    progress.remove_task(tasks.pop(old))
                tasks[key] = progress.add_task(f"{label} {name} {phase}", total=total)
            progress.update(tasks[key], completed=done, total=total)

        yield listener


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def result_header(result: BenchResult) -> str:
    """Which model, runtime, machine and date a table belongs to."""
    dev = result.device
    return (f"[bold]{result.runtime}[/] · {result.model} ({human_bytes(result.weight_bytes)} in memory) · "
            f"{dev['name']}, {dev['backend']} backend, {dev['cpus']} CPUs · MLX {dev['mlx']} · {result.date}")


def result_table(result: BenchResult) -> Table:
    """llama-bench's layout (test pp<prompt>+tg<generated>), one row per trial and a median row,
    plus time to first token, memory and bandwidth columns."""
    d = result.to_dict()
    cfg, dev = result.config, result.device
    table = Table()
    for col in ("#", "test", "pp tok/s", "tg tok/s", "TTFT s", "peak GB", "GB/s", "% peak"):
        table.add_column(col, justify="left" if col in ("#", "test") else "right", no_wrap=True)
    test = f"pp{cfg.prompt_tokens}+tg{cfg.generation_tokens}"

    def row(name, m, style=None):
        table.add_row(name, test, f"{m['prefill_tps']:.2f}", f"{m['decode_tps']:.2f}", f"{m['ttft_s']:.2f}",
                      f"{m['peak_memory_gb']:.2f}", f"{m['achieved_gbps']:.2f}", f"{m['peak_pct']:.1f}",
                      style=style)

    for i, trial in enumerate(d["trials"], start=1):
        row(str(i), trial)
    table.add_section()
    row("median", d["median"], style="bold")
    table.caption = (f"pp = prefill, tg = decode; weights read per decoded token "
                     f"{human_bytes(result.weight_bytes_per_token)}; peak bandwidth {dev['peak_gbps']:.1f} GB/s "
                     f"({dev['peak_source']})")
    return table
