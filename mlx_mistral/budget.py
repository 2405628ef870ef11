"""Sizing a forced tool call to the token budget, so that it finishes within max_tokens.

The grammar (constrain.py) bounds every value; here those bounds are narrowed to what a
request's max_tokens can hold, and a budget too small for even one call is refused up front.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Optional

from .constrain import Limits, ToolChoice, bound_schema, tool_choice_name
from .errors import MistralError


def _referenced(schema: dict, root: dict) -> Optional[Any]:
    """The schema a local "$ref" points to, or None when there is none."""
    ref = schema.get("$ref")
    if not (isinstance(ref, str) and ref.startswith("#/")):
        return None
    target: Any = root
    for part in ref[2:].split("/"):
        target = target.get(part, {}) if isinstance(target, dict) else {}
    return target


def minimal_value(schema: Any, root: Optional[dict] = None, depth: int = 8) -> Any:
    """The shortest JSON value a schema admits, near enough to size a token budget: required
    keys only, minimal strings and arrays (a pattern is not read)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth <= 0:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return min(schema["enum"], key=lambda v: len(json.dumps(v)))
    target = _referenced(schema, root)
    if target is not None:
        return minimal_value(target, root, depth - 1)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            options = [minimal_value(s, root, depth - 1) for s in schema[key]]
            return min(options, key=lambda v: len(json.dumps(v)))
    if isinstance(schema.get("allOf"), list):
        merged = {k: v for s in schema["allOf"] if isinstance(s, dict) for k, v in s.items()}
        return minimal_value(merged, root, depth - 1)
    types = schema.get("type")
    kinds = types if isinstance(types, list) else [types]
    if "properties" in schema or "object" in kinds:
        props = schema.get("properties") or {}
        return {k: minimal_value(props.get(k, {}), root, depth - 1) for k in schema.get("required", [])}
    if "array" in kinds:
        return [minimal_value(schema.get("items", {}), root, depth - 1)] * int(schema.get("minItems", 0))
    if "string" in kinds:
        return "a" * int(schema.get("minLength", 0))
    if kinds[0] in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        return max(0, int(low)) if isinstance(low, (int, float)) else 0
    return False if "boolean" in kinds else None


def minimal_call_tokens(tokenizer, tool: dict) -> int:
    """Tokens of the shortest call of `tool`: [TOOL_CALLS], the list of one call, and EOS."""
    fn = tool["function"]
    args = minimal_value(fn.get("parameters") or {"type": "object", "properties": {}})
    text = json.dumps([{"name": fn["name"], "arguments": args if isinstance(args, dict) else {}}])
    return len(tokenizer.encode(text, bos=False)) + 2


def _max_bytes(schema: Any, root: dict, depth: int = 6) -> int:
    """About the most tokens any value a bounded schema (constrain.bound_schema) admits can take:
    its JSON text at a token per character, two for a string's character (an escape)."""
    if not isinstance(schema, dict) or depth <= 0:
        return 10**9  # unbounded or too deep to say: never fits
    if "const" in schema or "enum" in schema:
        return max(len(json.dumps(v).encode()) for v in schema.get("enum", [schema.get("const")]))
    target = _referenced(schema, root)
    if target is not None:
        return _max_bytes(target, root, depth - 1)
    sizes = [_max_bytes(s, root, depth - 1) for key in ("anyOf", "oneOf") for s in schema.get(key) or []]
    types = schema.get("type")
    kinds = set(types if isinstance(types, list) else [types]) - {None}
    if "object" in kinds or "properties" in schema:
        props = schema.get("properties") or {}
        size = 2 + sum(len(json.dumps(k).encode()) + 4 + _max_bytes(v, root, depth - 1) for k, v in props.items())
        for value in (schema.get("patternProperties") or {}).values():
            size += schema.get("maxProperties", 0) * (2 + 64 * 4 + 4 + _max_bytes(value, root, depth - 1))
        sizes.append(size)
    if "array" in kinds:
        sizes.append(2 + schema.get("maxItems", 10**6) * (2 + _max_bytes(schema.get("items", {}), root, depth - 1)))
    if "string" in kinds:
        sizes.append(2 + 2 * schema.get("maxLength", 10**6))  # a character, or a short escape
    if kinds & {"integer", "number"}:
        digits = max(len(str(int(abs(schema.get(k, 0))))) for k in ("minimum", "maximum"))
        sizes.append(2 + digits + 1 + 20)  # sign, point and at most 20 fraction digits
    if kinds & {"boolean", "null"}:
        sizes.append(5)
    return max(sizes) if sizes else 10**9


def max_call_tokens(tokenizer, tool: dict, limits: Limits) -> int:
    """An upper bound on the tokens of one call of `tool` under `limits` (its own text and the
    separator before the next call): the call's fixed text as the tokenizer writes it, its
    arguments at a token per character."""
    fn = tool["function"]
    params = bound_schema(fn.get("parameters") or {"type": "object", "properties": {}}, limits)
    head = len(tokenizer.encode(json.dumps({"name": fn["name"], "arguments": {}, "id": "a" * 9}), bos=False))
    return head + 2 + _max_bytes(params, params)


def _shrunk(limits: Limits) -> Limits:
    return replace(limits, max_string=max(1, limits.max_string // 2), max_items=max(1, limits.max_items // 2),
                   max_properties=max(1, limits.max_properties // 2), max_depth=max(1, limits.max_depth - 1),
                   max_abs_number=max(9, limits.max_abs_number // 1000), max_decimals=max(1, limits.max_decimals // 2))


def fit_to_budget(tokenizer, tools: Optional[list[dict]], tool_choice: ToolChoice, limits: Limits,
                  max_tokens: int) -> Limits:
    """The limits under which a forced call finishes within `max_tokens`: shorter strings and
    arrays and fewer offered calls as the budget shrinks. A budget that cannot hold one minimal
    call of a tool that may be chosen is a MistralError. Other requests keep `limits`.

    The sizing takes nearly the worst a sampler can do under the grammar (every optional key,
    every bound reached, a token per character of the arguments), so even a random model
    finishes; it trusts the tokenizer's own spelling of the call's fixed text. A schema whose own
    bounds exceed the budget can still be cut; the server then drops the unfinished call."""
    named = tool_choice_name(tool_choice)
    if not tools or not (named is not None or tool_choice in ("required", "any")):
        return limits
    chosen = [t for t in tools if named is None or t["function"]["name"] == named]
    if not chosen:
        return limits  # plan() names the mistake
    need = min(minimal_call_tokens(tokenizer, t) for t in chosen)
    if max_tokens < need:
        names = ", ".join(t["function"]["name"] for t in chosen)
        raise MistralError(f"max_tokens={max_tokens} cannot hold one complete call of {names}: "
                           f"the shortest needs about {need} tokens")
    room = max_tokens - 4  # [TOOL_CALLS], the list's brackets, EOS
    for _ in range(24):  # each round halves the bounds; 24 reach the floor of every one
        worst = max(max_call_tokens(tokenizer, t, limits) for t in chosen)
        if worst <= room or limits == _shrunk(limits):
            break
        limits = _shrunk(limits)
    return replace(limits, max_calls=max(1, min(limits.max_calls, room // worst)))


__all__ = ["fit_to_budget", "max_call_tokens", "minimal_value", "minimal_call_tokens"]
