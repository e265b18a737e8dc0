"""Bounds on HTTP request bodies: an ASGI middleware for every route, and a body reader.

``BodyLimit`` (installed by ``node.http_api.create_app``) answers ``413`` with
``{"detail": {"reason": "body_too_large", "message": str, "limit": int}}``

- at once when ``Content-Length`` is over the route's limit: the body is never read;
- for a body without ``Content-Length`` (chunked), as soon as the bytes received pass the limit:
  reading stops there, and whatever the route made of the partial body is replaced by the 413.

A route's limit is ``ROUTE_BODY_LIMITS[path]`` or ``DEFAULT_BODY_LIMIT`` (1 MiB); routes may
apply smaller limits of their own with ``read_body``, which reads into one growing buffer
(linear time; ``body += chunk`` on ``bytes`` copies the whole body at every chunk).

Hand-written (about a hundred lines) because neither Hypercorn 0.18 nor Starlette/FastAPI bounds
request bodies, and the one PyPI middleware for it (content-size-limit-asgi 0.1.5, last released
in 2020) neither checks ``Content-Length`` up front nor answers with JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.a2a_rpc import DEFAULT_MAX_BODY as A2A_BODY_LIMIT

DEFAULT_BODY_LIMIT = 1 << 20
ROUTE_BODY_LIMITS: Mapping[str, int] = {"/a2a": A2A_BODY_LIMIT}
MAX_LENGTH_DIGITS = 19  # a Content-Length of more digits is over any limit here


def too_large_detail(limit: int, size: int | None = None) -> dict[str, Any]:
    """The ``detail`` of a 413 answer: what was too large and the limit in bytes."""
    what = f"the request body ({size} bytes)" if size is not None else "the request body"
    return {"reason": "body_too_large",
            "message": f"{what} is larger than the limit of {limit} bytes", "limit": limit}


class BodyTooLarge(HTTPException):
    """413 for a request body over ``limit`` bytes. An HTTPException, so FastAPI's own body
    parsing passes it through (it turns other exceptions into a 400)."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        super().__init__(413, None)
        self.detail: Any = too_large_detail(limit, size)  # a dict, as FastAPI renders it
        self.limit = limit


def content_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when it has none (a chunked body). Hypercorn's
    h11 parser has already refused a malformed or conflicting one with 400."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.strip()
            if not text.isdigit():
                return None
            return int(text) if len(text) <= MAX_LENGTH_DIGITS else 1 << 63
    return None


async def read_body(request: Request, limit: int, *, cut: bool = False) -> bytes:
    """The request body, read into one buffer and never past ``limit`` bytes: BodyTooLarge when
    Content-Length or the bytes received pass it, or with ``cut`` the first ``limit + 1`` bytes
    (for a caller whose own size check reports the error)."""
    declared = content_length(request.scope)
    if not cut and declared is not None and declared > limit:
        raise BodyTooLarge(limit, declared)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            if cut:
                return bytes(body[:limit + 1])
            raise BodyTooLarge(limit)
    return bytes(body)


class BodyLimit:
    """ASGI middleware: a 413 JSON answer for any request body over its route's limit."""

    def __init__(self, app: ASGIApp, default: int = DEFAULT_BODY_LIMIT,
                 limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.default = default
        self.limits = dict(limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        declared = content_length(scope)
        if declared is not None:
            if declared > limit:
                await _answer_413(scope, receive, send, limit, declared)
            else:  # the server ends the body at Content-Length
                await self.app(scope, receive, send)
            return
        received, over, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received, over
            if over:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the route's answer to a cut body: replaced by the 413 below
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:  # whatever a route made of a cut-off body: replaced by the 413
            if not over:
                raise
        if over and not started:
            await _answer_413(scope, receive, send, limit, None)


async def _answer_413(scope: Scope, receive: Receive, send: Send, limit: int,
                      size: int | None) -> None:
    response = JSONResponse({"detail": too_large_detail(limit, size)}, status_code=413,
                            headers={"Connection": "close"})
    await response(scope, receive, send)
