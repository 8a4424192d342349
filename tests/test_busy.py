"""A database that answers, but not in time: a statement past DB_STATEMENT_TIMEOUT_MS, or every pooled connection
in use for DB_POOL_TIMEOUT, is `503 database busy, try again`, never a 500, and never "unavailable" (which sends
an operator looking for a network problem). A table locked from outside plays the slow database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import URL

from app.application import create_app
from tests.conftest import bearer, make_settings, sign, user_claims
from tests.test_pool import url_arguments

BUSY = {"detail": "database busy, try again"}


@asynccontextmanager
async def served(database_url: URL, tmp_path: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(make_settings(database_url, tmp_path, **settings))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


@asynccontextmanager
async def profiles_locked(database_url: URL) -> AsyncIterator[asyncpg.Connection]:
    """`profiles` locked against every reader and writer until the block ends."""
    holder = await asyncpg.connect(**url_arguments(database_url))
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE profiles IN ACCESS EXCLUSIVE MODE")
            yield holder
    finally:
        await holder.close()


async def wait_until_blocked(holder: asyncpg.Connection) -> None:
    """Until another session waits for `profiles` (at most 5 seconds)."""
    deadline = time.monotonic() + 5
    query = "SELECT count(*) FROM pg_locks WHERE relation = 'profiles'::regclass AND NOT granted"
    while not await holder.fetchval(query):
        assert time.monotonic() < deadline, "no request got as far as the lock"
        await asyncio.sleep(0.02)


def assert_busy(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == BUSY
    assert response.headers["retry-after"]


async def test_a_statement_past_its_timeout_is_busy(database_url: URL, tmp_path: Path) -> None:
    auth = bearer(sign(user_claims()))
    async with served(database_url, tmp_path, db_statement_timeout_ms=300) as http:
        async with profiles_locked(database_url):
            assert_busy(await http.get("/profile", headers=auth))
        assert (await http.get("/profile", headers=auth)).status_code == 404  # and the connection serves again


async def test_a_pool_with_every_connection_in_use_is_busy(database_url: URL, tmp_path: Path) -> None:
    """One hot-path connection, held by a request waiting on the lock; the next request waits for the pool."""
    auth = bearer(sign(user_claims()))
    async with served(database_url, tmp_path, db_pool_size=1, db_pool_timeout=0.3) as http:
        async with profiles_locked(database_url) as holder:
            first = asyncio.ensure_future(http.get("/profile", headers=auth))
            await wait_until_blocked(holder)
            assert_busy(await http.get("/profile", headers=auth))
        assert (await first).status_code == 404


async def test_a_session_pool_with_every_connection_in_use_is_busy(database_url: URL, tmp_path: Path) -> None:
    """The same for the ORM sessions' pool (SQLAlchemy's), through a profile change."""
    auth = bearer(sign(user_claims()))
    async with served(database_url, tmp_path, db_session_pool_size=1, db_pool_timeout=0.3) as http:
        assert (await http.post("/profile", headers=auth, json={"full_name": "Ada"})).status_code == 201
        async with profiles_locked(database_url) as holder:
            first = asyncio.ensure_future(http.put("/profile", headers=auth, json={"full_name": "Ada L."}))
            await wait_until_blocked(holder)
            assert_busy(await http.put("/profile", headers=auth, json={"full_name": "Ada K."}))
        assert (await first).status_code == 200
