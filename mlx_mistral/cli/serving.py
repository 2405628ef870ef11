"""`mlx-mistral serve`: the OpenAI-compatible server (mlx_mistral.server)."""

from __future__ import annotations

import click

from ..engine import DEFAULT_MAX_BATCH
from .options import Finite, model_option


@click.command()
@model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="MLX_MISTRAL_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(min=1), default=None,
              help="Reply length for requests that set none (default: 4096, capped by the context).")
@click.option("--max-batch", type=click.IntRange(1, 64), default=DEFAULT_MAX_BATCH, show_default=True,
              help="Requests generated together in one batch; later ones wait in arrival order.")
@click.option("--no-ui", "ui", is_flag=True, flag_value=False, default=True, help="Do not serve the chat page at /.")
@click.option("--drain-timeout", type=Finite(min=0), default=30.0, show_default=True,
              help="Seconds that in-flight requests get to finish on Ctrl-C / SIGTERM.")
def serve(model, host, port, api_key, default_max_tokens, max_batch, ui, drain_timeout):
    """OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models."""
    from ..server import serve as run_server

    run_server(model, host=host, port=port, api_key=api_key, default_max_tokens=default_max_tokens,
               drain_timeout=drain_timeout, max_batch=max_batch, ui=ui)
