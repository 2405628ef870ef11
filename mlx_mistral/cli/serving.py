"""`mlx-mistral serve`: the OpenAI-compatible server (mlx_mistral.server)."""

from __future__ import annotations

import click

from ..constrain import Limits
from ..engine import DEFAULT_MAX_BATCH
from .options import Finite, model_option

_DEFAULT = Limits()
# the bounds constrained output puts on values its schema leaves unbounded (constrain.Limits)
LIMIT_OPTIONS = [
    ("--limit-string", "max_string", _DEFAULT.max_string, "characters of a string without maxLength"),
    ("--limit-items", "max_items", _DEFAULT.max_items, "items of an array without maxItems"),
    ("--limit-properties", "max_properties", _DEFAULT.max_properties, "keys of a free-form object"),
    ("--limit-depth", "max_depth", _DEFAULT.max_depth, "nesting of free-form JSON"),
    ("--limit-digits", "digits", len(str(_DEFAULT.max_abs_number)) - 1,
     "integer digits of a number without minimum/maximum"),
    ("--limit-decimals", "max_decimals", _DEFAULT.max_decimals, "fraction digits of a number without multipleOf"),
    ("--limit-calls", "max_calls", _DEFAULT.max_calls, "tool calls in one reply"),
]


def limit_options(f):
    for flag, name, default, what in reversed(LIMIT_OPTIONS):
        f = click.option(flag, name, type=click.IntRange(1, 10**6 if name != "digits" else 15), default=default,
                         show_default=True, help=f"Bound on {what} in tool calls and JSON replies.")(f)
    return f


def limits_from(kw: dict) -> Limits:
    digits = kw.pop("digits")
    return Limits(max_abs_number=10**digits, **{name: kw.pop(name) for _, name, *_ in LIMIT_OPTIONS
                                                 if name != "digits"})


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
@limit_options
def serve(model, host, port, api_key, default_max_tokens, max_batch, ui, drain_timeout, **limits):
    """OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/responses, /v1/models."""
    from ..server import serve as run_server

    run_server(model, host=host, port=port, api_key=api_key, default_max_tokens=default_max_tokens,
               drain_timeout=drain_timeout, max_batch=max_batch, ui=ui, limits=limits_from(limits))
