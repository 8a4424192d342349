"""The one ASGI middleware around every request: a request id and one log line, security headers, a body
size limit, and CORS for browser requests.

One plain ASGI layer (not several, and not BaseHTTPMiddleware): each layer costs a call and a `send`
wrapper per request, and this runs on every request the front end makes.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable

from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class ApiMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_origins: list[str],
        max_body_bytes: int,
        body_limits: dict[str, int],
        hsts: bool,
        docs_paths: Iterable[str],
    ) -> None:
        self.app = app
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
        self.api_headers = _ALWAYS + _JSON_ONLY + (_HSTS if hsts else ())
        self.docs_headers = _ALWAYS + (_HSTS if hsts else ())
        self.docs_paths = frozenset(docs_paths)

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
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
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
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send_with_headers)
                return
            if length is None and scope["method"] not in ("GET", "HEAD"):
                receive = _counting(receive, limit, detail)  # no declared length: count what arrives
            target = self.cors if origin is not None else self.app
            await target(scope, receive, send_with_headers)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
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


def _counting(receive: Receive, limit: int, detail: str) -> Receive:
    received = 0

    async def counting_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(status_code=413, detail=detail)
        return message

    return counting_receive
