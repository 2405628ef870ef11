"""Refusing constraints no reply could meet, before any generation: JSON schemas that no finite
value satisfies (false, {"not": {}}, an empty enum or type, bounds that cross, a required property
that contains itself through $ref). Without this a constrained reply could only run to the length
limit and end as output that fails its schema, or a grammar error after the stream has started.
"""

from __future__ import annotations

from typing import Any, Optional

from .errors import MistralError

MAX_SCHEMA_NESTING = 64  # JSON containers in one schema: 30-odd levels of nested objects
MAX_SCHEMA_VISITS = 20_000  # subschemas visited while checking one schema: beyond, too complex


class _Satisfiable:
    """Whether a schema admits some finite JSON value. A reference met again on its own path
    gives no finite value along that path (a required recursive $ref), so it counts as none
    there; other branches may still succeed. True answers are memoized per reference."""

    def __init__(self, root: Any):
        self.root, self.visits, self.path, self.known = root, 0, [], set()

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return True  # a remote reference: llguidance refuses it with its own message
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise MistralError(f"the JSON schema refers to {ref}, which it does not define")
        return node

    def __call__(self, s: Any) -> bool:
        self.visits += 1
        if self.visits > MAX_SCHEMA_VISITS:
            raise MistralError("the JSON schema is too complex to enforce (too many references to expand)")
        if isinstance(s, bool) or not isinstance(s, dict):
            return s is not False
        ref = s.get("$ref")
        if isinstance(ref, str) and ref not in self.known:
            if ref in self.path:
                return False
            self.path.append(ref)
            try:
                ok = self(self.resolve(ref))
            finally:
                self.path.pop()
            if not ok:
                return False
            self.known.add(ref)
        return self.local(s)

    def local(self, s: dict) -> bool:
        if s.get("not") in (True, {}) or s.get("enum") == [] or s.get("type") == []:
            return False
        if isinstance(s.get("allOf"), list) and not all(self(x) for x in s["allOf"]):
            return False
        for key in ("anyOf", "oneOf"):
            if isinstance(s.get(key), list) and not any(self(x) for x in s[key]):
                return False
        if "enum" in s or "const" in s:
            return True
        types = s.get("type", ["object", "array", "string", "number", "boolean", "null"])
        return any(self.of_type(t, s) for t in ([types] if isinstance(types, str) else types))

    def of_type(self, t: str, s: dict) -> bool:
        def above(low, high):
            return isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high

        if t == "object":
            props, extra = s.get("properties"), s.get("additionalProperties", True)
            props = props if isinstance(props, dict) else {}
            required = [r for r in s.get("required", []) if isinstance(r, str)] if isinstance(
                s.get("required"), list) else []
            return not above(len(set(required)), s.get("maxProperties")) and all(
                self(props.get(r, extra)) for r in required)
        if t == "array":
            prefix = s.get("prefixItems") if isinstance(s.get("prefixItems"), list) else []
            need = s.get("minItems", 0) if isinstance(s.get("minItems"), int) else 0
            items = s.get("items", True)
            return (not above(need, s.get("maxItems")) and all(self(x) for x in prefix[:need])
                    and (need <= len(prefix) or self(items)))
        if t == "string":
            return not above(s.get("minLength"), s.get("maxLength"))
        if t in ("number", "integer"):
            return not above(s.get("minimum"), s.get("maximum"))
        return True


def json_nesting(value: Any) -> int:
    """How many containers deep `value` nests (iterative: any depth is safe to measure)."""
    deepest, stack = 0, [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def check_nesting(schema: Any) -> None:
    """Refuses a schema nested deeper than any compiler here recurses safely."""
    depth = json_nesting(schema)
    if depth > MAX_SCHEMA_NESTING:
        raise MistralError(f"the JSON schema nests {depth} levels deep; at most {MAX_SCHEMA_NESTING} are accepted")


def schema_problem(schema: Any) -> None:
    """Raises a one-line MistralError when no finite JSON value satisfies `schema` (false, a
    {"not": {}}, an empty enum, a required recursive $ref, bounds that cross...): such a
    constraint could only end at the length limit with output that fails it."""
    check_nesting(schema)
    if not _Satisfiable(schema)(schema):
        raise MistralError("no JSON value satisfies this schema (an empty enum or type, a \"not\" of "
                           "everything, bounds that cross, or a required property that contains itself)")


def check_constraints(tools: Optional[list[dict]] = None, response_format: Optional[dict] = None) -> None:
    """Refuses a request whose tool parameters or response schema nothing finite satisfies."""
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        try:
            schema_problem(function.get("parameters", {}))
        except MistralError as e:
            raise MistralError(f"tool {function.get('name')!r}: {e}") from None
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema_problem((response_format.get("json_schema") or {}).get("schema", {}))
