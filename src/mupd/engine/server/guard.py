"""The server's ASGI middleware: the bearer token, then the request body's size."""

from __future__ import annotations

import hmac
from typing import Any, Callable, Optional

from fastapi import HTTPException
from fastapi.responses import JSONResponse


def error_response(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    """The one JSON shape of every refusal, `{"detail": message}`, from the middleware or a route."""
    # a message quoting the request could hold a lone surrogate, which UTF-8 cannot carry
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"detail": safe}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: the bearer token (401), then the body size (413, by header or while
    streaming). Plain ASGI, so that handlers still see a client's disconnect."""

    def __init__(self, app: Any, token: str, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self._expected = token.encode("utf-8")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope["path"] != "/health":
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._expected):
                return await error_response(401, "missing or wrong bearer token",
                                            {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length")
        limit = f"the server's limit of {self.max_bytes} bytes"
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(413, f"request body of {int(length)} bytes exceeds {limit}")(
                scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body exceeds {limit}")
            return message

        return await self.app(scope, limited, send)
