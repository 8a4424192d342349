"""HTTP behaviour around every route: request ids and logs, size limits, security headers, docs switch."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import URL

from app.application import create_app
from app.errors import install_error_handlers
from app.logs import JsonFormatter
from tests.conftest import make_settings


async def test_request_id_is_echoed_or_made(client: httpx.AsyncClient) -> None:
    given = await client.get("/", headers={"X-Request-ID": "front-end-42"})
    assert given.headers["x-request-id"] == "front-end-42"
    made = await client.get("/", headers={"X-Request-ID": "bad id with spaces\n"})
    assert made.headers["x-request-id"] != "bad id with spaces"
    assert len(made.headers["x-request-id"]) == 32


async def test_one_log_line_per_request_with_the_user(
    client: httpx.AsyncClient, auth: dict[str, str], user_id: uuid.UUID, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="app.requests"):
        await client.post("/profile", headers={**auth, "X-Request-ID": "req-1"})
    lines = [record for record in caplog.records if record.name == "app.requests"]
    assert len(lines) == 1
    line = json.loads(JsonFormatter().format(lines[0]))
    assert line["method"] == "POST"
    assert line["path"] == "/profile"
    assert line["status"] == 201
    assert line["request_id"] == "req-1"
    assert line["user_id"] == str(user_id)
    assert line["duration_ms"] >= 0


async def test_security_headers(client: httpx.AsyncClient) -> None:
    api = await client.get("/health")
    assert api.headers["x-content-type-options"] == "nosniff"
    assert api.headers["x-frame-options"] == "DENY"
    assert api.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert api.headers["cache-control"] == "no-store"
    assert "strict-transport-security" not in api.headers  # only in production (behind HTTPS)
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "content-security-policy" not in docs.headers  # the docs page loads its scripts


async def test_declared_oversized_body_is_413(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    body = b'{"full_name": "' + b"x" * (1024 * 1024) + b'"}'
    response = await client.post("/profile", headers={**auth, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 413
    assert response.json() == {"detail": "request body too large: at most 1048576 bytes"}
    assert (await client.get("/profile", headers=auth)).status_code == 404


async def test_streamed_oversized_body_is_413(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"full_name": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = await client.post("/profile", headers={**auth, "Content-Type": "application/json"}, content=chunks())
    assert response.status_code == 413


async def test_docs_pages_load_only_assets_this_server_serves(client: httpx.AsyncClient) -> None:
    """/docs and /redoc work with no internet access: every script, style and icon they load comes from here."""
    for page in ("/docs", "/redoc"):
        html = (await client.get(page)).text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url: ?'([^']+)'", html)
        assert assets, html
        for asset in assets:
            assert re.match(r"/[^/]", asset), f"{page} loads {asset} from elsewhere"
            answer = await client.get(asset)
            assert answer.status_code == 200, asset
        assert "fonts.googleapis.com" not in html
    assert (await client.get("/docs/assets/swagger-ui-bundle.js")).headers["content-type"].startswith("text/javascript")
    assert (await client.get("/docs/assets/redoc.standalone.js")).status_code == 200


async def test_docs_are_off_in_production_unless_enabled(database_url: URL, tmp_path: Path) -> None:
    production = {"environment": "production", "supabase_url": "https://project.supabase.co"}
    for enabled, status in ((None, 404), (True, 200)):
        application = create_app(make_settings(database_url, tmp_path, docs_enabled=enabled, **production))
        transport = httpx.ASGITransport(app=application)  # the pages need no database: no lifespan here
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert (await http.get(path)).status_code == status, (enabled, path)


async def test_docs_can_be_turned_off(database_url: URL, tmp_path: Path) -> None:
    application = create_app(make_settings(database_url, tmp_path, docs_enabled=False))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert (await http.get(path)).status_code == 404
            assert (await http.get("/health")).status_code == 200


def _caused_by(error: Exception, cause: BaseException) -> Exception:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("raised", "status"),
    [
        (RuntimeError("a bug"), 500),
        (ConnectionResetError("reset by peer"), 503),
        # Found only down the chain: a library's own error raised while the connection was lost.
        (_caused_by(RuntimeError("operation failed"), ConnectionResetError("reset by peer")), 503),
        (_caused_by(ValueError("bad value"), KeyError("x")), 500),
    ],
    ids=["bug", "connection", "connection-in-the-cause-chain", "no-connection-in-the-chain"],
)
async def test_a_lost_connection_anywhere_in_the_chain_is_503(raised: Exception, status: int) -> None:
    application = FastAPI()

    @application.get("/fails")
    async def fails() -> None:
        raise raised

    install_error_handlers(application)
    transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        response = await http.get("/fails")
    assert response.status_code == status
    if status == 503:
        assert response.json() == {"detail": "database unavailable, try again shortly"}
        assert response.headers["retry-after"]
