"""OpenAI's error shape: the exception a handler raises, and the handlers that turn it (and
FastAPI's own validation and HTTP errors) into {"error": {message, type, param, code}}.

Error bodies are written with ASCII escapes: a message may quote what the client sent, and a
lone surrogate (valid in JSON text, not in UTF-8) must not turn a 4xx into a failed response.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class OpenAIError(Exception):
    """A request the server refuses, sent back as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_location(loc: tuple) -> Optional[str]:
    """pydantic's error location as OpenAI's `param` ("messages.0.role")."""
    parts = [str(p) for p in loc if p != "body"]
    # the union branch pydantic tried ("str", "list[TextPart]") is noise to a client
    parts = [p for p in parts if not re.match(r"^(str|int|list\[.*\]|function-after\[.*|[A-Z]\w*)$", p)]
    return ".".join(parts) or None


class ErrorResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _reply(e: OpenAIError) -> JSONResponse:
    return ErrorResponse(e.body(), status_code=e.status)


def internal_error() -> JSONResponse:
    """The reply to an exception no handler expected: a JSON 500 rather than a dropped connection."""
    return _reply(OpenAIError(500, "The server failed on this request; it is logged and the server "
                              "goes on serving.", type="server_error", code="internal_error"))


async def openai_error(request, e: OpenAIError):
    return _reply(e)


async def invalid_request(request, e: RequestValidationError):
    errors = e.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    if first.get("type") == "json_invalid":
        return _reply(OpenAIError(400, "The request body is not valid JSON: "
                                  f"{first.get('ctx', {}).get('error', first['msg'])}", code="invalid_json"))
    param = error_location(tuple(first.get("loc", ())))
    message = str(first["msg"]).removeprefix("Value error, ").splitlines()[0][:500] + (f" (at {param})" if param else "")
    return _reply(OpenAIError(400, message, param=param, code="invalid_value"))


async def http_error(request, e: StarletteHTTPException):
    kind = "not_found" if e.status_code == 404 else None
    return _reply(OpenAIError(e.status_code, str(e.detail), code=kind))


async def too_deep(request, e: RecursionError):
    # a body nested thousands of levels deep exhausts the JSON parser's (or pydantic's) recursion
    return _reply(OpenAIError(400, "The request body is nested too deeply.", code="invalid_json"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(RecursionError, too_deep)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
