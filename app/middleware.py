"""The one ASGI middleware around every request: a request id (on every log line written meanwhile) and one log
line, the request's metrics when they are on, security headers, a body size limit and deadline, and CORS for
browser requests.

One plain ASGI layer (not several, and not BaseHTTPMiddleware): each layer costs a call and a `send`
wrapper per request, and this runs on every request the front end makes.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import time
from collections.abc import Callable, Iterable

from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import REQUEST_ID
from app.metrics import RequestMetrics

logger = logging.getLogger("app.requests")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Suitable for a JSON API; the interactive docs pages get only the first group (they load scripts).
_ALWAYS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
_JSON_ONLY = (
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"cache-control", b"no-store"),
)
_HSTS = ((b"strict-transport-security", b"max-age=63072000; includeSubDomains"),)
# After a refused body the rest of it may still be on its way: the connection is not used again.
_CLOSE = {"Connection": "close"}
_NO_BODY = frozenset({"GET", "HEAD"})
# A body arrives in pieces of up to 64 KiB; once freed, glibc keeps their memory for reuse rather than give it back,
# so 100 slow 4 MiB bodies left a worker 400 MB larger for good. After a request with at least this much body the
# worker asks glibc to give back what is free (malloc_trim), once a second at most: a few milliseconds each time.
LARGE_BODY_BYTES = 64 * 1024
TRIM_DELAY_SECONDS = 1.0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to ask
        return None
    return trim


class ApiMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_origins: list[str],
        max_body_bytes: int,
        body_limits: dict[str, int],
        body_timeout: float,
        hsts: bool,
        docs_paths: Iterable[str],
        metrics: RequestMetrics | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        # CORS matters only to browsers, which always send Origin: other callers skip that layer.
        self.cors = CORSMiddleware(
            app,
            allow_origins=allowed_origins,
            allow_credentials=True,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
        self.max_body_bytes = max_body_bytes
        self.body_limits = body_limits
        self.body_timeout = body_timeout
        self.api_headers = _ALWAYS + _JSON_ONLY + (_HSTS if hsts else ())
        self.docs_headers = _ALWAYS + (_HSTS if hsts else ())
        self.docs_paths = frozenset(docs_paths)
        self.malloc_trim = _malloc_trim()
        self.trim_pending = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        offered = origin = length = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                offered = value.decode("latin-1")
            elif name == b"origin":
                origin = value
            elif name == b"content-length":
                length = value
        request_id = offered if offered and _VALID_REQUEST_ID.match(offered) else os.urandom(16).hex()
        REQUEST_ID.set(request_id)  # this request's task's own: see app/logs.py
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight += 1
        path: str = scope["path"]
        extra_headers = [
            *(self.docs_headers if path in self.docs_paths else self.api_headers),
            (b"x-request-id", request_id.encode()),
        ]
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra_headers]
            await send(message)

        try:
            limit = self.body_limits.get(path, self.max_body_bytes)
            detail = f"request body too large: at most {limit} bytes"
            if length is not None and length.isdigit() and int(length) > limit:
                refused = JSONResponse({"detail": detail}, status_code=413, headers=_CLOSE)
                await refused(scope, receive, send_with_headers)
                return
            if scope["method"] not in _NO_BODY and length != b"0":
                # With no declared length, what arrives is counted against the limit.
                receive = _BodyReader(receive, self.body_timeout, limit if length is None else None, detail)
            target = self.cors if origin is not None else self.app
            await target(scope, receive, send_with_headers)
        finally:
            if isinstance(receive, _BodyReader) and receive.received >= LARGE_BODY_BYTES:
                self.give_memory_back_soon()
            elapsed = time.perf_counter() - started
            if metrics is not None:
                metrics.in_flight -= 1
                metrics.observe(scope, status, elapsed)
            elapsed_ms = elapsed * 1000
            user_id = state.get("user_id")
            logger.info(
                "%s %s %s %.1fms",
                scope["method"],
                path,
                status,
                elapsed_ms,
                extra={
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "duration_ms": round(elapsed_ms, 2),
                    "request_id": request_id,
                    "user_id": str(user_id) if user_id else None,
                },
            )

    def give_memory_back_soon(self) -> None:
        if self.malloc_trim is None or self.trim_pending:
            return
        self.trim_pending = True
        asyncio.get_running_loop().call_later(TRIM_DELAY_SECONDS, self.give_memory_back)

    def give_memory_back(self) -> None:
        self.trim_pending = False
        if self.malloc_trim is not None:
            self.malloc_trim(0)


class _BodyReader:
    """The request's `receive`, with one deadline for the whole body (a client that declares 100 bytes and sends 10
    would otherwise hold its connection, and what it sent, as long as it likes), and a size limit when no length
    was declared."""

    __slots__ = ("deadline", "done", "limit", "receive", "received", "timeout", "too_large")

    def __init__(self, receive: Receive, timeout: float, limit: int | None, too_large: str) -> None:
        self.receive = receive
        self.timeout = timeout
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.limit = limit
        self.too_large = too_large
        self.received = 0
        self.done = False

    async def __call__(self) -> Message:
        if self.done:  # the body is complete: what follows is a wait for the client leaving, no deadline
            return await self.receive()
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self.receive()
        except TimeoutError:
            detail = f"request body not received in time: the whole body must arrive within {self.timeout:g}s"
            raise HTTPException(status_code=408, detail=detail, headers=_CLOSE) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.limit is not None and self.received > self.limit:
                raise HTTPException(status_code=413, detail=self.too_large, headers=_CLOSE)
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message
