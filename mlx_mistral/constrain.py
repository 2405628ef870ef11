"""Constrained decoding with llguidance: tool calls and JSON replies that cannot come out malformed.

Mistral Small 3 (Tekken V7) calls tools as `[TOOL_CALLS]` (token 9) followed by a JSON list
`[{"name": ..., "arguments": {...}, "id": ...}]`, written as Python's `json.dumps` writes it.
The grammar here spells out that list: each call names a declared tool and its arguments are a
`%json` of that tool's `parameters`, so every completed call parses and validates.

Every JSON value the grammar admits is bounded (strings, arrays, objects, numbers, nesting) and
no insignificant whitespace is free: a sampler drawing from the allowed tokens, even at random,
finishes a call in a bounded number of tokens instead of wandering through spaces forever.
The bounds only narrow what a schema accepts, so anything generated still validates against it.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import mlx.core as mx

from .errors import MistralError, first_line
from .schema_check import check_constraints, schema_problem  # noqa: F401  (re-exported)

TOOL_CALLS_ID = 9  # [TOOL_CALLS] in the Tekken V7 vocabulary
# json.dumps' separators: what the model saw in training, and no room for free whitespace
# oneOf is enforced as anyOf (llguidance cannot check exclusivity) rather than refused
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                "coerce_one_of": True}
CALL_ID_PATTERN = "[a-zA-Z0-9]{9}"
# a free-form object key: one to 64 characters that need no escape
KEY_PATTERN = '^[^"\\\\\\x00-\\x1f]{1,64}$'

ToolChoice = Union[str, dict, None]


@dataclass(frozen=True)
class Limits:
    """Bounds applied where a schema leaves a value unbounded."""

    max_string: int = 512  # characters of a string without maxLength
    max_items: int = 32  # items of an array without maxItems
    max_properties: int = 16  # keys of a free-form object
    max_depth: int = 4  # nesting of free-form JSON (a schema of {} or a json_object reply)
    max_abs_number: int = 10**15  # |x| of a number or integer without bounds (no exponents)
    max_decimals: int = 6  # fraction digits of a number without multipleOf
    max_calls: int = 8  # tool calls in one reply


# ---------------------------------------------------------------------------- schema bounds

def free_json(limits: Limits, depth: Optional[int] = None, *, top_object: bool = False) -> dict:
    """A schema for any JSON value, nested at most `depth` containers deep."""
    depth = limits.max_depth if depth is None else depth
    n = limits.max_abs_number
    scalars = [{"type": "string", "maxLength": limits.max_string},
               {"type": "integer", "minimum": -n, "maximum": n},
               {"type": "number", "minimum": -n, "maximum": n, "multipleOf": 10.0 ** -limits.max_decimals},
               {"type": "boolean"}, {"type": "null"}]
    if depth <= 0 and not top_object:
        return {"anyOf": scalars}
    inner = free_json(limits, depth - 1) if depth > 1 else {"anyOf": scalars}
    obj = {"type": "object", "maxProperties": limits.max_properties,
           "patternProperties": {KEY_PATTERN: inner}, "additionalProperties": False}
    if top_object:
        return obj
    return {"anyOf": scalars + [{"type": "array", "maxItems": limits.max_items, "items": inner}, obj]}


def bound_schema(schema: Any, limits: Limits, depth: Optional[int] = None) -> Any:
    """A copy of `schema` with every unbounded string, array, number and object bounded."""
    depth = limits.max_depth if depth is None else depth
    if schema is True or schema == {}:
        return free_json(limits, depth)
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [bound_schema(s, limits, depth) for s in out[key]]
    for key in ("$defs", "definitions", "properties", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {k: bound_schema(s, limits, depth - 1 if key.endswith("roperties") else depth)
                        for k, s in out[key].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = bound_schema(out["items"], limits, depth - 1)
    if "enum" in out or "const" in out:
        return out
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types}
    # keywords only act on values of their own type, so adding all that apply is safe
    # never below the schema's own minimum: a tight limit must not make a schema unsatisfiable
    if "string" in types:
        out.setdefault("maxLength", max(limits.max_string, out.get("minLength", 0)))
    if "array" in types:
        out.setdefault("maxItems", max(limits.max_items, out.get("minItems", 0)))
    if types & {"number", "integer"}:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -limits.max_abs_number
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = limits.max_abs_number
    if "number" in types and "integer" not in types:
        out.setdefault("multipleOf", 10.0 ** -limits.max_decimals)  # bounds the fraction digits
    if "object" in types:
        extra = out.get("additionalProperties", True)
        if "properties" in out or "patternProperties" in out:
            # like OpenAI's strict mode: only the declared keys
            out["additionalProperties"] = False
        elif extra is not False:
            value = free_json(limits, depth - 1) if extra is True else bound_schema(extra, limits, depth - 1)
            out["patternProperties"] = {KEY_PATTERN: value}
            out["additionalProperties"] = False
            out.setdefault("maxProperties", limits.max_properties)
    return out


def _json_rule(schema: dict) -> str:
    """An inline `%json` for lark, with the fixed separators."""
    return "%json " + json.dumps(dict(schema, **{"x-guidance": JSON_OPTIONS}), ensure_ascii=False)


# ---------------------------------------------------------------------------- grammars

def tool_names(tools: Optional[list[dict]]) -> list[str]:
    return [t["function"]["name"] for t in tools or []]


def tool_choice_name(tool_choice: ToolChoice) -> Optional[str]:
    """The function a choice names, or None for the modes auto/none/required."""
    if isinstance(tool_choice, dict):
        try:
            return tool_choice["function"]["name"]
        except (KeyError, TypeError):
            raise MistralError('tool_choice must be "auto", "none", "required" or '
                               '{"type": "function", "function": {"name": ...}}') from None
    if tool_choice in (None, "auto", "none", "required", "any"):
        return None
    return str(tool_choice)


def calls_grammar(tools: list[dict], limits: Limits, parallel: bool = True) -> str:
    """Lark rules `calls: <[9]> [call, ...]` for these tools; one rule per tool so each
    tool's `parameters` keeps its own `$defs` root."""
    rules, alternatives = [], []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        head = json.dumps('{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": ',
                          ensure_ascii=False)
        rules.append(f"call_{i}: {head} args_{i} call_id? \"}}\"")
        rules.append(f"args_{i}: {_json_rule(bound_schema(params, limits))}")
        alternatives.append(f"call_{i}")
    more = f' (", " call){{0,{limits.max_calls - 1}}}' if parallel and limits.max_calls > 1 else ""
    return "\n".join([
        f'calls: <[{TOOL_CALLS_ID}]> "[" call{more} "]"',
        "call: " + " | ".join(alternatives),
        *rules,
        f'call_id: ", \\"id\\": \\"" CALL_ID "\\""',
        f"CALL_ID: /{CALL_ID_PATTERN}/",
    ])


def response_schema(response_format: Optional[dict], limits: Limits) -> Optional[dict]:
    """The bounded schema a plain reply must follow, or None for free text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return free_json(limits, top_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise MistralError('response_format json_schema needs {"json_schema": {"schema": {...}}}')
        return bound_schema(schema, limits)
    raise MistralError(f'response_format type must be "text", "json_object" or "json_schema", not {kind!r}')


@dataclass(frozen=True)
class Plan:
    """What to enforce: a lark grammar (None: nothing), whether to wait for [TOOL_CALLS]
    before enforcing it, and token ids to forbid outright."""

    grammar: Optional[str] = None
    wait_for: Optional[int] = None
    banned: tuple[int, ...] = ()


def plan(tools: Optional[list[dict]], tool_choice: ToolChoice = "auto",
         response_format: Optional[dict] = None, limits: Limits = Limits(),
         parallel_tool_calls: bool = True) -> Plan:
    """Turn an OpenAI-style request's tool choice and response format into a `Plan`."""
    tools = list(tools or [])
    named = tool_choice_name(tool_choice)
    names = tool_names(tools)
    if named is not None and named not in names:
        raise MistralError(f"tool_choice names {named!r}, which is not among the tools {names}")
    mode = "required" if named is not None or tool_choice == "any" else (tool_choice or "auto")
    if mode == "required" and not tools:
        raise MistralError('tool_choice "required" needs at least one tool')
    chosen = [t for t in tools if named is None or t["function"]["name"] == named]
    if mode == "required":
        # a forced call wins its turn: the response_format governs the content replies only
        # (agents send one on every turn); a named choice is exactly one call of that function
        calls = calls_grammar(chosen, limits, parallel_tool_calls and named is None)
        return Plan(grammar="start: calls\n" + calls)
    schema = response_schema(response_format, limits)
    if mode == "none" or not tools:
        if schema is None:
            return Plan(banned=(TOOL_CALLS_ID,) if mode == "none" and tools else ())
        return Plan(grammar=f"start: {_json_rule(schema)}")
    calls = calls_grammar(chosen, limits, parallel_tool_calls)
    if schema is None:  # auto: free text until the model starts a call
        return Plan(grammar="start: calls\n" + calls, wait_for=TOOL_CALLS_ID)
    return Plan(grammar=f"start: calls | json_reply\njson_reply: {_json_rule(schema)}\n" + calls)


# ---------------------------------------------------------------------------- refusals

def _first_mask_check(lltok, grammar: str) -> None:
    """Builds the matcher and its first mask, so a grammar llguidance cannot expand (a parser
    limit hit at the first token) is refused now, not after the reply has started."""
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    m = _matcher(lltok, grammar)
    bitmask = allocate_token_bitmask(1, lltok.vocab_size)
    fill_next_token_bitmask(m, bitmask)
    if m.is_error() or not bitmask.any():
        raise MistralError("the output grammar allows no token to start the reply: "
                           f"{first_line(Exception(m.get_error() or 'nothing matches'))[:200]}")


# ---------------------------------------------------------------------------- the processor

def llg_tokenizer(tokenizer):
    """The llguidance view of a Tekken tokenizer, built once (~1 s) and kept on the tokenizer."""
    cached = vars(tokenizer).get("_llg_tokenizer")
    if cached is None:
        if getattr(tokenizer, "mistral", None) is None:
            raise MistralError("constrained decoding needs a Tekken (mistral-common) tokenizer")
        from mistral_common.guidance.tokenizer import from_mistral_tokenizer

        cached = from_mistral_tokenizer(tokenizer.mistral)
        vars(tokenizer)["_llg_tokenizer"] = cached
    return cached


def _matcher(lltok, grammar: str):
    import llguidance as llg

    m = llg.LLMatcher(lltok, grammar, log_level=0)
    if not m.is_error():
        return m
    error = m.get_error()
    if "Unimplemented keys" not in error:
        raise MistralError(f"cannot build the output grammar: {error.splitlines()[0][:300]}")
    # a schema keyword llguidance cannot enforce: enforce the rest rather than refuse the request
    warnings.warn(f"schema keywords not enforced: {error.splitlines()[0][:200]}", stacklevel=3)
    m = llg.LLMatcher(lltok, grammar.replace('"x-guidance": {', '"x-guidance": {"lenient": true, '), log_level=0)
    if m.is_error():
        raise MistralError(f"cannot build the output grammar: {m.get_error().splitlines()[0][:300]}")
    return m


class GrammarProcessor:
    """Logits processor `(history_ids, logits) -> logits` that masks what the grammar forbids.

    The mask for step n+1 needs the token sampled at step n, but not the step's logits: the
    forward pass is queued first (`mx.async_eval`), then the CPU consumes the sampled id and
    computes the next mask while the device runs the model.
    """

    def __init__(self, tokenizer, grammar: str, *, wait_for: Optional[int] = None):
        from llguidance.numpy import allocate_token_bitmask

        self.lltok = llg_tokenizer(tokenizer)
        self.matcher = _matcher(self.lltok, grammar)
        self.wait_for = wait_for
        self.active = wait_for is None
        self.bitmask = allocate_token_bitmask(1, self.lltok.vocab_size)  # (1, ceil(V / 32)) int32
        self.shifts = mx.arange(32, dtype=mx.int32)
        self.seen: Optional[int] = None  # history length already consumed
        self.mask_seconds = 0.0  # llguidance computing masks
        self.host_seconds = 0.0  # all host work per step, past the wait for the sampled id
        self.masks = 0

    def _consume(self, tokens: list[int]) -> None:
        for t in tokens:
            if not self.active:
                if t != self.wait_for:
                    continue
                self.active = True
            if not self.matcher.consume_token(t):
                raise MistralError(f"token {t} broke the output grammar: {first_line(Exception(self.matcher.get_error()))[:200]}")

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        if self.seen is None:
            self.seen = history.size
            start = time.perf_counter()
        elif history.size > self.seen:
            mx.async_eval(logits)  # the device runs the forward pass while the CPU works below
            new = history[self.seen:].tolist()  # waits for the previous step's sample only
            start = time.perf_counter()
            self._consume(new)
            self.seen = history.size
        else:
            start = time.perf_counter()
        if not self.active:
            return logits
        from llguidance.numpy import fill_next_token_bitmask

        tic = time.perf_counter()
        fill_next_token_bitmask(self.matcher, self.bitmask)
        self.mask_seconds += time.perf_counter() - tic
        self.masks += 1
        words = mx.array(self.bitmask[0])  # (W,) int32, bit j of word w allows id 32w + j
        allowed = ((words[:, None] >> self.shifts[None, :]) & 1).reshape(-1)  # (32W,)
        vocab = logits.shape[-1]
        if allowed.size < vocab:  # ids past the tokenizer's vocabulary are never allowed
            allowed = mx.concatenate([allowed, mx.zeros((vocab - allowed.size,), mx.int32)])
        out = mx.where(allowed[:vocab].astype(mx.bool_), logits, -mx.inf)
        self.host_seconds += time.perf_counter() - start
        return out


def ban_tokens(ids: tuple[int, ...]):
    """Logits processor forbidding `ids` (e.g. [TOOL_CALLS] under tool_choice "none")."""
    def processor(history: mx.array, logits: mx.array) -> mx.array:
        keep = mx.ones((logits.shape[-1],), dtype=mx.bool_)
        keep[mx.array(list(ids))] = False
        return mx.where(keep, logits, -mx.inf)

    return processor


def _nothing_to_enforce(tokenizer, p: Plan) -> bool:
    # other chat formats have no [TOOL_CALLS] to wait for or forbid
    return getattr(tokenizer, "mistral", None) is None and (p.wait_for is not None or p.banned)


def check_request(tokenizer, tools: Optional[list[dict]] = None, tool_choice: ToolChoice = "auto",
                  response_format: Optional[dict] = None, *, limits: Limits = Limits(),
                  parallel_tool_calls: bool = True) -> None:
    """Raises the MistralError `make_processor` would for this request, without building the
    processor: no MLX work, so a server can refuse a request before queueing it. Schemas no
    finite value satisfies are refused too, and grammars whose first step fails."""
    check_constraints(tools, response_format)
    p = plan(tools, tool_choice, response_format, limits, parallel_tool_calls)
    if p.grammar is not None and not _nothing_to_enforce(tokenizer, p):
        _first_mask_check(llg_tokenizer(tokenizer), p.grammar)


def make_processor(tokenizer, tools: Optional[list[dict]] = None, tool_choice: ToolChoice = "auto",
                   response_format: Optional[dict] = None, *, limits: Limits = Limits(),
                   parallel_tool_calls: bool = True):
    """The logits processor enforcing a request's tool choice and response format, or None."""
    check_constraints(tools, response_format)
    p = plan(tools, tool_choice, response_format, limits, parallel_tool_calls)
    if _nothing_to_enforce(tokenizer, p):
        return None
    if p.grammar is not None:
        return GrammarProcessor(tokenizer, p.grammar, wait_for=p.wait_for)
    if p.banned:
        return ban_tokens(p.banned)
    return None


__all__ = ["Limits", "Plan", "plan", "bound_schema", "free_json", "calls_grammar", "response_schema",
           "GrammarProcessor", "ban_tokens", "make_processor", "check_request", "check_constraints",
           "schema_problem", "llg_tokenizer", "TOOL_CALLS_ID"]
