"""Pooler mode through a real PgBouncer in transaction mode, as Supabase's transaction pooler works.

In transaction mode each transaction may run on a different server connection, so a prepared statement
made in one transaction is missing (or, under another client's name, already present) in the next. With
`DB_POOLER_MODE=true` the app keeps no statement cache and gives each statement a unique name; without it
the same traffic fails, which the second test shows (so the first one proves something).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import URL

from app.application import create_app
from app.config import describe
from tests.conftest import TokenFactory, bearer, free_port, make_settings, throwaway_database

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
# PgBouncer refuses to run as root; the embedded PostgreSQL runs as this user in that case too.
UNPRIVILEGED_USER = "pgserver"
USERS = 20

pytestmark = pytest.mark.skipif(
    PGBOUNCER is None, reason="pgbouncer is not installed (Debian/Ubuntu: apt-get install pgbouncer)"
)


def pgbouncer_version() -> tuple[int, int]:
    assert PGBOUNCER is not None
    output = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"(\d+)\.(\d+)", output)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


@pytest.fixture(scope="module")
async def pooled_database(server_url: URL) -> AsyncIterator[URL]:
    async with throwaway_database(server_url, "pooled") as url:
        yield url


@pytest.fixture(scope="module")
def pgbouncer(pooled_database: URL) -> Iterator[URL]:
    """A PgBouncer in transaction mode on a loopback port, with two server connections for many clients."""
    assert PGBOUNCER is not None
    # The embedded server listens on a Unix socket only (`?host=/dir`); PgBouncer reaches it there too.
    host = describe(pooled_database).host
    target = f"host={host} port={pooled_database.port or 5432} dbname={pooled_database.database}"
    target += f" user={pooled_database.username}"
    if pooled_database.password:
        target += f" password={pooled_database.password}"
    port = free_port()
    # Readable by the unprivileged user (pytest's own temporary folders are private to root).
    workdir = Path(tempfile.mkdtemp(prefix="picads-pgbouncer-"))
    settings = [
        "[databases]",
        f"picads = {target}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = any",
        "pool_mode = transaction",
        "default_pool_size = 2",
        "max_client_conn = 200",
        # The app sets these per connection; PgBouncer cannot pass them through a shared server connection.
        "ignore_startup_parameters = extra_float_digits,statement_timeout,lock_timeout",
        f"logfile = {workdir / 'pgbouncer.log'}",
        f"pidfile = {workdir / 'pgbouncer.pid'}",
    ]
    if pgbouncer_version() >= (1, 21):  # newer PgBouncers can track prepared statements; test the plain mode
        settings.append("max_prepared_statements = 0")
    (workdir / "pgbouncer.ini").write_text("\n".join(settings) + "\n")
    command = [PGBOUNCER, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        import pwd

        try:
            account = pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError:
            pytest.skip(f"pgbouncer refuses to run as root and there is no user {UNPRIVILEGED_USER!r} to run it as")
        os.chown(workdir, account.pw_uid, account.pw_gid)
        command = ["runuser", "-u", UNPRIVILEGED_USER, "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = workdir / "pgbouncer.log"
                    output = process.stdout.read().decode() if process.stdout else ""
                    pytest.fail(f"pgbouncer did not start: {output} {log.read_text() if log.exists() else ''}")
                time.sleep(0.05)
        yield URL.create("postgresql+asyncpg", username="picads", host="127.0.0.1", port=port, database="picads")
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


async def profile_flow(http: httpx.AsyncClient, headers: dict[str, str]) -> list[int]:
    """The front end's first sign-in, then a rename: GET 404, POST 201, GET 200, PUT 200."""
    statuses = [(await http.get("/profile", headers=headers)).status_code]
    statuses.append((await http.post("/profile", headers=headers, json={"full_name": "Pooled"})).status_code)
    statuses.append((await http.get("/profile", headers=headers)).status_code)
    statuses.append((await http.put("/profile", headers=headers, json={"full_name": "Renamed"})).status_code)
    return statuses


async def run_users(
    url: URL, tmp_path: Path, token: TokenFactory, pooler_mode: bool
) -> list[list[int] | BaseException]:
    settings = make_settings(url, tmp_path, db_pooler_mode=pooler_mode, db_pool_size=10)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            users = [bearer(token(uuid.uuid4())) for _ in range(USERS)]
            return await asyncio.gather(*(profile_flow(http, headers) for headers in users), return_exceptions=True)


async def test_profile_flow_through_a_transaction_pooler(pgbouncer: URL, tmp_path: Path, token: TokenFactory) -> None:
    # The app's start-up (migrations under an advisory lock) goes through PgBouncer as well.
    results = await run_users(pgbouncer, tmp_path, token, pooler_mode=True)
    assert results == [[404, 201, 200, 200]] * USERS


async def test_without_pooler_mode_the_same_traffic_fails(pgbouncer: URL, tmp_path: Path, token: TokenFactory) -> None:
    results = await run_users(pgbouncer, tmp_path, token, pooler_mode=False)
    failed = [result for result in results if isinstance(result, BaseException) or any(s >= 500 for s in result)]
    assert failed, "every request worked without pooler mode: this PgBouncer does not exercise it"
