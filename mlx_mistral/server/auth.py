"""The API key check: a dependency of every endpoint but /health."""

from __future__ import annotations

import secrets
from typing import Optional

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import OpenAIError

bearer = HTTPBearer(auto_error=False)


def _raw(text: str) -> bytes:
    # compare_digest refuses str with non-ASCII characters; headers arrive decoded as latin-1
    return text.encode("utf-8", "surrogatepass")


async def authorize(request: Request,
                    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
    """Passes when the app has no key, or the request sends it as 'Authorization: Bearer KEY'."""
    api_key = request.app.state.settings.api_key
    if api_key is None:
        return
    if credentials is None or not secrets.compare_digest(_raw(credentials.credentials), _raw(api_key)):
        raise OpenAIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                          code="invalid_api_key")
