"""HTTP behaviour around every route: request ids and logs, size limits and deadlines, security headers, docs
switch. Slow clients are played over real sockets against `python main.py`."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import URL

from app.application import create_app
from app.errors import install_error_handlers
from app.logs import JsonFormatter, TextFormatter
from tests.conftest import PROJECT_ROOT, TEST_JWT_SECRET, free_port, make_settings
from tests.fake_stripe import WEBHOOK_SECRET


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


FORGED = "2026-01-01 00:00:00,000 INFO    app.requests: POST /admin/profiles/x/credits 200 1.0ms"


async def test_json_log_fields_hold_no_control_characters(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="app.requests"):
        await client.get("/x%0a" + quote(FORGED) + "%00")
    (record,) = [record for record in caplog.records if record.name == "app.requests"]
    line = json.loads(JsonFormatter().format(record))
    assert line["path"] == f"/x\\x0a{FORGED}\\x00"
    assert line["message"].startswith(f"GET /x\\x0a{FORGED}\\x00 404 ")


def test_a_traceback_stays_under_its_record() -> None:
    """An exception's message is data too: in the readable format every line after the record's is indented."""
    try:
        raise ValueError(f"bad input\n{FORGED}\x1b[8m")
    except ValueError:
        record = logging.makeLogRecord({"msg": "unhandled", "exc_info": sys.exc_info()})
    first, *rest = TextFormatter().format(record).split("\n")
    assert first.endswith(" unhandled")
    assert rest
    assert all(line.startswith("    ") for line in rest)
    assert f"    {FORGED}\\x1b[8m" in rest


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


async def test_the_webhook_takes_what_stripe_sends_and_no_more(client: httpx.AsyncClient) -> None:
    response = await client.post("/webhook", content=b"x" * (256 * 1024 + 1))
    assert response.status_code == 413
    assert response.json() == {"detail": "request body too large: at most 262144 bytes"}
    assert response.headers["connection"] == "close"  # the rest of the body is never read


# --- Slow clients, over real sockets ------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveServer:
    port: int
    pid: int
    log: Path


@pytest.fixture(scope="module")
def live_server(database_url: URL, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`python main.py` with a 1-second body deadline and the readable log format, its log in a file."""
    folder = tmp_path_factory.mktemp("live")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DB_", "SUPABASE_", "DATABASE"))}
    env.update(
        {
            "ENVIRONMENT": "test",
            "DATABASE_URL": database_url.render_as_string(hide_password=False),
            "SUPABASE_JWT_SECRET": TEST_JWT_SECRET,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "BODY_TIMEOUT": "1",
            "LOG_FORMAT": "text",
            "DATA_DIR": str(folder / "data"),
            "PORT": str(port),
        }
    )
    log = folder / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "main.py")], cwd=folder, env=env, stdout=output, stderr=output
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield LiveServer(port, server.pid, log)
    finally:
        server.terminate()
        server.wait(30)


async def unfinished_body(server: LiveServer, path: str, declared: int, sent: int, wait: float) -> bytes:
    """Declare a body of `declared` bytes, send `sent` of them, and return all the server answers before it closes
    the connection (or what came within `wait` seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Stripe-Signature: t=1,v1=00\r\nContent-Length: {declared}\r\n\r\n".encode()
        )
        writer.write(b"x" * sent)
        await writer.drain()
        answer = b""
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                answer += chunk
        return answer
    except TimeoutError:
        return answer
    finally:
        writer.close()


@pytest.mark.parametrize("path", ["/webhook", "/profile"])
async def test_a_body_that_never_arrives_is_408_and_the_connection_closed(live_server: LiveServer, path: str) -> None:
    """It declares 100 bytes and sends 10: the connection would otherwise be held as long as the client likes."""
    started = time.monotonic()
    answer = await unfinished_body(live_server, path, declared=100, sent=10, wait=5)
    waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"request body not received in time: the whole body must arrive within 1s" in answer
    assert 0.9 < waited < 4, f"answered after {waited:.1f}s"  # and closed: the read above ended


async def test_a_path_cannot_forge_a_log_line(live_server: LiveServer) -> None:
    """A request line that would write a made-up record of its own, and a NUL and a terminal escape, into the
    readable log of a real server."""
    paths = ["/x%0a" + quote(FORGED), "/y%00z%1b[31m%e2%80%a8w"]
    for path in paths:
        reader, writer = await asyncio.open_connection("127.0.0.1", live_server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 404 ")
        writer.close()
    expected = [f"GET /x\\x0a{FORGED} 404 ", "GET /y\\x00z\\x1b[31m\\u2028w 404 "]
    for _ in range(50):  # the line is written just after the answer
        log = live_server.log.read_bytes()
        if all(line.encode() in log for line in expected):
            break
        await asyncio.sleep(0.1)
    assert b"\x00" not in log
    assert b"\x1b" not in log
    assert "\u2028".encode() not in log
    lines = log.decode().split("\n")
    assert not [line for line in lines if line.startswith(FORGED[:23])]
    for text in expected:
        assert len([line for line in lines if text in line]) == 1, text


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's memory from /proc (Linux)")
async def test_memory_held_by_unfinished_bodies_is_given_back(live_server: LiveServer) -> None:
    """100 webhook bodies of 250 KB, each 10 bytes short, until the deadline sends them away."""
    if not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.skip("not glibc: nothing to give memory back with")

    async def attack(size: int) -> list[bytes]:
        bodies = (unfinished_body(live_server, "/webhook", size, size - 10, 5) for _ in range(100))
        return await asyncio.gather(*bodies)

    await attack(1_000)  # loads what 100 connections and their 408s need: not what this measures
    await asyncio.sleep(1.5)
    before = _rss_mib(live_server.pid)
    answers = await attack(250_000)
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
    await asyncio.sleep(1.5)  # given back a second after the last large body
    after = _rss_mib(live_server.pid)
    assert after - before < 8, f"{before:.0f} MiB before, {after:.0f} MiB after 25 MB of bodies came and went"


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
