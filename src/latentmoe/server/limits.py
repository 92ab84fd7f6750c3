"""Bounds on what one client can make the server do, and the ASGI middleware that enforces the HTTP-level ones.

A request body is read whole by `BodyGuard` before any route sees it: at most `max_request_bytes` (413 beyond, or at
once if Content-Length says so) and within `body_timeout_s` of the headers (408 otherwise), so a slow or endless
upload holds neither memory nor a handler. Header read and idle keep-alive timeouts belong to the connection
(connection.py); length bounds on prompts to the routes (prompts.py).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

_NO_BODY = ("GET", "HEAD", "OPTIONS", "DELETE")


@dataclass
class ServerLimits:
    max_request_bytes: int = 4 << 20   # 4 MiB: room for a 128k-token prompt as text or as ids
    body_timeout_s: float = 30.0       # the whole body must arrive within this long
    header_timeout_s: float = 10.0     # a new connection (or the next request on one) must send its headers in time
    keep_alive_s: int = 5              # an idle keep-alive connection is closed after this long
    limit_concurrency: int | None = 1024   # connections + in-flight requests before uvicorn answers 503
    allowed_origins: list[str] = field(default_factory=list)   # CORS: none unless given

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "body_timeout_s", "header_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError(f"ServerLimits.limit_concurrency must be >= 1 or None, got {self.limit_concurrency!r}")


async def send_error(send, status: int, message: str, type: str, code: str | None = None, close: bool = False,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """An OpenAI error envelope sent straight on the ASGI channel (for middleware, below the app's handlers)."""
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *(headers or [])]
    if close:   # the rest of the body is never read: the connection cannot carry another request
        hdrs.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


class BodyGuard:
    """Reads each request body whole, bounded in size and time, then hands it to the app; adds `nosniff` to every
    response (no answer of this server is meant to be sniffed into HTML or script)."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_nosniff(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(message)

        if scope["method"] in _NO_BODY:
            return await self.app(scope, receive, send_nosniff)
        too_big = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await send_error(send_nosniff, 413, too_big, "invalid_request_error", "request_too_large", True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks, size = [], 0
        try:
            while True:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    return await send_error(send_nosniff, 413, too_big, "invalid_request_error", "request_too_large",
                                            True)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        except asyncio.TimeoutError:
            return await send_error(send_nosniff, 408, f"the request body did not arrive within {self.timeout_s:g} s",
                                    "invalid_request_error", "request_timeout", True)
        body, replayed = b"".join(chunks), False

        async def replay():   # the body once, then the real channel (for disconnect notices)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_nosniff)
