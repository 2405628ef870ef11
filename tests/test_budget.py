"""A forced tool call sized to max_tokens: it finishes within the budget, even from random weights,
and a budget too small for one call is refused before anything runs."""

from __future__ import annotations

import json

import jsonschema
import pytest
from test_constrain import BOOK, MESSAGES, PING, SCHEMAS

from mlx_mistral.budget import fit_to_budget, max_call_tokens, minimal_call_tokens, minimal_value
from mlx_mistral.constrain import Limits
from mlx_mistral.errors import MistralError
from mlx_mistral.generate import chat_completion

NAMED_BOOK = {"type": "function", "function": {"name": "book_trip"}}


def test_the_minimal_value_validates():
    for schema in SCHEMAS.values():
        jsonschema.validate(minimal_value(schema), schema)


def test_a_budget_below_one_call_is_refused(tekken):
    need = minimal_call_tokens(tekken, BOOK)
    with pytest.raises(MistralError, match="cannot hold one complete call of book_trip"):
        fit_to_budget(tekken, [BOOK, PING], NAMED_BOOK, Limits(), need - 1)
    # "required" may pick the cheaper ping, so the same budget holds
    fit_to_budget(tekken, [BOOK, PING], "required", Limits(), need - 1)
    assert fit_to_budget(tekken, [BOOK], "auto", Limits(), 1) == Limits()  # not forced: untouched


def test_bounds_shrink_with_the_budget(tekken):
    need = minimal_call_tokens(tekken, BOOK)
    small, large = (fit_to_budget(tekken, [BOOK], "required", Limits(), need + extra) for extra in (20, 2000))
    assert small.max_calls == 1 and small.max_string < large.max_string <= Limits().max_string
    assert small.max_items <= large.max_items


def worst_case_budget(tok, tool) -> int:
    """The smallest max_tokens whose fitted limits hold the worst call of `tool`."""
    floor = fit_to_budget(tok, [tool], "required", Limits(), minimal_call_tokens(tok, tool))
    return max_call_tokens(tok, tool, floor) + 4


@pytest.mark.parametrize("seed", range(6))
def test_a_forced_call_finishes_within_a_tight_budget(tiny, seed):
    budget = worst_case_budget(tiny[1], BOOK)
    assert budget < 400  # well below what the default limits would need
    out = chat_completion(*tiny, MESSAGES, tools=[BOOK, PING], tool_choice=NAMED_BOOK, max_tokens=budget,
                          temperature=1.0, seed=seed)
    assert out["finish_reason"] == "tool_calls", out
    (call,) = out["message"]["tool_calls"]  # a named choice: exactly one call
    assert call["function"]["name"] == "book_trip"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["book_trip"])


@pytest.mark.parametrize("seed", range(4))
def test_a_call_cut_below_the_worst_case_leaves_no_raw_text(tiny, seed):
    need = minimal_call_tokens(tiny[1], BOOK)
    out = chat_completion(*tiny, MESSAGES, tools=[BOOK], tool_choice="required", max_tokens=need + 4,
                          temperature=1.0, seed=seed)
    message = out["message"]
    if out["finish_reason"] == "length":
        assert not message["content"] and "tool_calls" not in message
    else:
        assert out["finish_reason"] == "tool_calls" and len(message["tool_calls"]) == 1
