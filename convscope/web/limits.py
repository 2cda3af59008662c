"""The web app's request limits: an ASGI middleware that refuses bodies over the upload limit, before
and while reading, with the API's ``{"error": ...}`` reply."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from convscope.errors import ConvscopeError, ImageError

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class UploadTooLarge(Exception):
    """The request body is over the limit."""


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes, by ``Content-Length`` before reading
    and by counting while reading (chunked uploads declare no length)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await error_response(413, self._message())(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise UploadTooLarge(self._message())
            return message

        try:
            await self.app(scope, limited, send)
        except UploadTooLarge as exc:
            await error_response(413, str(exc))(scope, receive, send)

    def _message(self) -> str:
        return f"upload: request body is over the {self.limit / 1e6:g} MB limit"


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def status_for(exc: ConvscopeError) -> int:
    if isinstance(exc, ImageError) and "limit" in exc.reason:
        return 413
    if isinstance(exc, ImageError):
        return 415 if "not an image" in exc.reason else 400
    return 400
