"""Error reports: what reaches Sentry when an endpoint fails, sent to a local server standing in for Sentry's ingest
(the DSN points at it); no secret in any of it, and nothing at all without a DSN."""

from __future__ import annotations

import gzip
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sentry_sdk
from sqlalchemy import text
from sqlalchemy.engine import URL

from app.application import create_app
from app.config import Settings
from app.error_reports import start_error_reports
from tests.conftest import TokenFactory, bearer, make_settings, throwaway_database


class Ingest:
    """Sentry's envelope endpoint, on 127.0.0.1: keeps each envelope it receives, raw and decoded."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        ingest = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ingest.raw.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.dsn = f"http://publickey@127.0.0.1:{self.server.server_address[1]}/1"

    def events(self) -> list[dict[str, Any]]:
        """The error events received (an envelope: a header line, then an item header and its payload per item)."""
        found = []
        for envelope in self.raw:
            lines = envelope.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if json.loads(header).get("type") == "event":
                    found.append(json.loads(payload))
        return found


@pytest.fixture
def ingest() -> Iterator[Ingest]:
    server = Ingest()
    yield server
    sentry_sdk.flush(5)
    sentry_sdk.get_global_scope().set_client(None)  # reports stop with the test
    server.server.shutdown()


# Secrets a failing request may carry, and this server's own (by value, whatever their shape).
COOKIE = "session=cookie-secret-4f1d"
BODY_SECRET = "body-secret-9b2e"
SIGNATURE = "t=1700000000,v1=" + "ab" * 32
DB_PASSWORD = "db-pass-7c41aa"
STRIPE_KEY = "sk_live_reportsSecret123"
SERVICE_ROLE = "sb_secret_reports_service_role_0123"
JWT_SECRET = "reports-jwt-secret-" + "y" * 32


def _secrets_settings(database_url: URL, tmp_path: Path, dsn: str) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        supabase_jwt_secret=JWT_SECRET,
        supabase_service_role_key=SERVICE_ROLE,
        stripe_secret_key=STRIPE_KEY,
        frontend_url="https://app.example.com",
        metrics_token="metrics-token-reports-0123456789",
        sentry_dsn=dsn,
        sentry_environment="staging",
        sentry_release="picads-backend@test-1",
    )


@pytest.fixture
async def broken_database(server_url: URL) -> AsyncIterator[URL]:
    async with throwaway_database(server_url, "reports") as url:
        yield url


async def test_a_failing_endpoint_is_reported_without_its_secrets(
    broken_database: URL, tmp_path: Path, ingest: Ingest, token: TokenFactory
) -> None:
    """A column renamed by hand under the running app: PUT /profile fails with a 500, and Sentry gets the exception
    with the request's id, environment and release, and none of what the request carried."""
    settings = _secrets_settings(broken_database, tmp_path, ingest.dsn)
    application = create_app(settings)
    user_token = token_for(settings, token)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            assert (await http.post("/profile", headers=bearer(user_token))).status_code == 201
            engine = application.state.resources.engine
            async with engine.begin() as connection:
                await connection.execute(text("ALTER TABLE profiles RENAME COLUMN full_name TO display_name"))
            failed = await http.put(
                "/profile?token=query-secret-55",
                headers={
                    **bearer(user_token),
                    "Cookie": COOKIE,
                    "Stripe-Signature": SIGNATURE,
                    "X-Request-ID": "report-1",
                },
                json={"full_name": f"Ada {BODY_SECRET} {STRIPE_KEY}"},
            )
    assert failed.status_code == 500
    sentry_sdk.flush(5)

    reported = [event for event in ingest.events() if event.get("exception")]
    assert reported, "no error report"
    report = reported[0]
    assert "UndefinedColumnError" in {value["type"] for value in report["exception"]["values"]}
    assert report["tags"]["request_id"] == "report-1"
    assert (report["environment"], report["release"]) == ("staging", "picads-backend@test-1")
    assert report["request"]["method"] == "PUT"
    assert report["request"]["headers"]["x-request-id"] == "report-1"
    everything = b"\n".join(ingest.raw).decode()
    for secret in (
        user_token,
        COOKIE.split("=")[1],
        SIGNATURE.split("v1=")[1],
        BODY_SECRET,
        STRIPE_KEY,
        "query-secret",
    ):
        assert secret not in everything
    assert "eyJ" not in everything


def token_for(settings: Settings, token: TokenFactory) -> str:
    from tests.conftest import sign, user_claims

    assert settings.supabase_jwt_secret is not None
    return sign(user_claims(uuid.uuid4()), key=settings.supabase_jwt_secret.get_secret_value())


def test_the_scrubber_removes_every_secret_from_an_event(tmp_path: Path, ingest: Ingest, token: TokenFactory) -> None:
    """Secrets in an exception's message, extra data, breadcrumbs and tags, by value and by shape."""
    database_url = URL.create("postgresql+asyncpg", "picads", DB_PASSWORD, "db.internal", 5432, "app")
    settings = _secrets_settings(database_url, tmp_path, ingest.dsn)
    assert start_error_reports(settings)
    jwt, idempotency_key = token(), f"key-{uuid.uuid4()}"
    secrets = {
        "database url": f"postgresql://picads:{DB_PASSWORD}@db.internal:5432/app",
        "jwt": jwt,
        "stripe key": STRIPE_KEY,
        "webhook secret": "whsec_reportsWebhookSecret",
        "service role": SERVICE_ROLE,
        "jwt secret": JWT_SECRET,
        "signature": SIGNATURE,
        "basic": "Basic dXNlcjpwYXNzd29yZA==",
        "password": "password=hunter2-reports",
    }
    sentry_sdk.add_breadcrumb(message=f"calling Stripe with {STRIPE_KEY}", data={"authorization": f"Bearer {jwt}"})
    with sentry_sdk.new_scope() as scope:
        scope.set_extra("settings", dict(secrets))
        scope.set_tag("note", f"key {STRIPE_KEY}")
        scope.set_context(
            "headers", {"Stripe-Signature": SIGNATURE, "Cookie": COOKIE, "Idempotency-Key": idempotency_key}
        )
        try:
            raise RuntimeError("could not connect: " + "; ".join(secrets.values()))
        except RuntimeError as exc:
            sentry_sdk.capture_exception(exc)
    sentry_sdk.flush(5)

    (report,) = ingest.events()
    message = report["exception"]["values"][0]["value"]
    assert message.startswith("could not connect: postgresql://picads:[Filtered]@db.internal:5432/app; ")
    everything = b"\n".join(ingest.raw).decode()
    for name, secret in {**secrets, "password": "hunter2-reports", "basic": "dXNlcjpwYXNzd29yZA=="}.items():
        assert secret not in everything, name
    for leftover in (DB_PASSWORD, "eyJ", "cookie-secret", "v1=abab", "whsec_reports", idempotency_key):
        assert leftover not in everything


async def test_nothing_is_sent_without_a_dsn(
    app: Any, client: httpx.AsyncClient, ingest: Ingest, database_url: URL, tmp_path: Path
) -> None:
    assert not start_error_reports(make_settings(database_url, tmp_path))
    assert not sentry_sdk.get_client().is_active()
    assert (await client.get("/nothing-here")).status_code == 404
    sentry_sdk.capture_message("would be sent")
    sentry_sdk.flush(2)
    assert ingest.raw == []
