"""The OpenAI request shapes the server accepts, validated before anything is queued.

Pydantic models give FastAPI both the validation and the OpenAPI spec clients (and fuzzers)
read. Deeper chat rules (role order, tool results matching calls) are mistral-common's: the
server turns its refusals into the same 400 error body (errors.py).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Mistral's tool and schema names; the chat format rejects anything else.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_STOPS = 4  # as OpenAI
MAX_N = 64  # the most a server's batch can be (serve --max-batch); the engine checks its own


def check_json_schema(schema: dict) -> dict:
    """Raises ValueError (a 400 through pydantic) unless `schema` is a valid JSON Schema that
    is not nested too deeply to compile, and that some finite JSON value satisfies."""
    from jsonschema import SchemaError, validators

    from ..errors import MistralError
    from ..schema_check import check_nesting, schema_problem

    try:
        check_nesting(schema)  # first: the validator below recurses once per level
    except MistralError as e:
        raise ValueError(str(e)) from None
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as e:
        raise ValueError(f"invalid JSON schema: {e.message}") from None
    except RecursionError:  # a $ref cycle jsonschema follows without end
        raise ValueError("invalid JSON schema: its references loop without end") from None
    try:
        schema_problem(schema)
    except MistralError as e:
        raise ValueError(str(e)) from None
    return schema


class _Model(BaseModel):
    # OpenAI clients send fields this server has no use for (user, metadata, logit_bias...)
    model_config = ConfigDict(extra="ignore")


# -- messages ---------------------------------------------------------------------------------

class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    def to_openai(self) -> dict:
        """The plain dict mistral-common's `from_openai` reads."""
        out = self.model_dump(exclude_none=True)
        if out["role"] == "developer":  # OpenAI's newer name for the system role
            out["role"] = "system"
        if out["role"] in ("user", "system", "tool") and "content" not in out:
            out["content"] = ""
        return out


# -- tools and output formats -----------------------------------------------------------------

class FunctionDef(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    description: Optional[str] = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Optional[bool] = None

    _schema = field_validator("parameters")(check_json_schema)


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class ToolName(_Model):
    name: str = Field(pattern=NAME_PATTERN)


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: ToolName


class JsonSchemaFormat(_Model):
    name: str = Field(pattern=NAME_PATTERN)
    description: Optional[str] = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None

    _schema = field_validator("schema_")(check_json_schema)


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return self


class StreamOptions(_Model):
    include_usage: bool = False


# -- requests ---------------------------------------------------------------------------------

class SamplingRequest(_Model):
    """What both endpoints share: the model, sampling, length and streaming."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=MAX_N, description="Replies to generate, together in one batch.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(None, description="token id (as a string) -> bias in [-100, 100]")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys must be token ids, not {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], not {bias}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return [s for s in stops if s]

    @property
    def length_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def logprobs_k(self) -> Optional[int]:
        """The engine's `logprobs`: None for none, k for the chosen id's plus the k most likely."""
        return None


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    @property
    def logprobs_k(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _tool_choice_matches_tools(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if choice in ("required",) and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
        return self

    def constraint(self) -> dict:
        """stream_generate's tools, tool_choice, response_format and parallel_tool_calls: every
        declared tool (so "none" can forbid calling any), OpenAI's defaults filled in."""
        choice = self.tool_choice
        return dict(
            tools=[t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None,
            tool_choice=choice.model_dump() if isinstance(choice, NamedToolChoice) else (choice or "auto"),
            response_format=self.response_format.model_dump(by_alias=True, exclude_none=True)
            if self.response_format else None,
            parallel_tool_calls=self.parallel_tool_calls is not False,
        )

    def prompt_tools(self) -> Optional[list[dict]]:
        """Tool definitions for the prompt; none when the client forbids calling them."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int]] = Field(
        description="Text to continue (or one-element list of text, or token ids)")
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False

    @property
    def logprobs_k(self) -> Optional[int]:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        if isinstance(v, list) and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            return v[0]
        return v
