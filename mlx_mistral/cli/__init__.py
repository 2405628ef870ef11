"""`mlx-mistral` command line: thin wrappers over the Python API.

The click group lives here; its commands by concern: commands.py (generate, chat, info,
cache-prompt), checkpoints.py (convert, synth), serving.py (serve), benchmark.py (bench). Their
shared option groups are options.py's, the chat loop repl.py's, the bench display bench_view.py's.
Each command imports what it runs when it runs, so `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Optional

import click

from .. import __version__
from ..errors import MistralError
from .benchmark import bench
from .checkpoints import convert_cmd, synth
from .commands import cache_prompt_command, chat, generate, info
from .serving import serve


class OneLineUsageError(click.ClickException):
    exit_code = 2  # click's status for a bad command line


class Group(click.Group):
    """Turns a MistralError anywhere below, or a failed write (a full disk, a closed pipe, a
    read-only place), into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MistralError as e:
            raise click.ClickException(str(e)) from None
        except click.UsageError as e:  # a bad option value: its one line, without the usage text
            raise OneLineUsageError(e.format_message()) from None
        except BrokenPipeError:
            # the reader of stdout left (`| head`): nothing more can be shown there, and Python's
            # flush at exit must not fail again
            with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.ClickException("stdout was closed before the output ended") from None
        except OSError as e:
            reason = e.strerror or str(e)
            raise click.ClickException(f"{reason}: {e.filename}" if e.filename else reason) from None


@click.group(cls=Group)
@click.version_option(__version__, prog_name="mlx-mistral")
def cli():
    """Run Mistral Small 3 with MLX."""


for command in (generate, chat, synth, convert_cmd, info, cache_prompt_command, serve, bench):
    cli.add_command(command)


def main(argv: Optional[list[str]] = None) -> None:
    from ..distributed import follower_main

    try:  # under mlx.launch, ranks other than 0 follow rank 0's engine instead of a command
        if follower_main():
            return
    except MistralError as e:
        raise SystemExit(f"Error: {e}") from None
    cli.main(args=argv, prog_name="mlx-mistral")

