"""The hot paths' connection pool against the real server: bounded, fair to waiters, self-healing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import URL

from app.config import split_sslmode
from app.database import DriverPool
from tests.conftest import make_settings


@pytest.fixture
async def pool(database_url: URL, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[DriverPool]:
    size = getattr(request, "param", 2)
    driver_pool = DriverPool(make_settings(database_url, tmp_path, db_pool_size=size, db_pool_timeout=5), database_url)
    yield driver_pool
    await driver_pool.close()


async def backend_pid(connection: asyncpg.Connection) -> int:
    pid: int = await connection.fetchval("SELECT pg_backend_pid()")
    return pid


@pytest.mark.parametrize("pool", [3], indirect=True)
async def test_more_checkouts_than_connections_are_all_served_by_at_most_the_pool_size(pool: DriverPool) -> None:
    async def checkout() -> int:
        connection = await pool.acquire()
        try:
            pid = await backend_pid(connection)
            await connection.execute("SELECT pg_sleep(0.01)")
        finally:
            await pool.release(connection, reusable=True)
        return pid

    pids = await asyncio.gather(*(checkout() for _ in range(30)))
    assert len(pids) == 30
    assert len(set(pids)) <= 3
    assert pool.opened <= 3


@pytest.mark.parametrize("pool", [1], indirect=True)
async def test_a_connection_that_is_not_reusable_is_closed_and_its_slot_goes_to_a_waiter(pool: DriverPool) -> None:
    first = await pool.acquire()
    first_pid = await backend_pid(first)
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the only connection is taken

    await pool.release(first, reusable=False)
    second = await asyncio.wait_for(waiting, 5)
    assert first.is_closed()
    assert await backend_pid(second) != first_pid
    await pool.release(second, reusable=True)
    assert pool.opened == 1


@pytest.mark.parametrize("pool", [1], indirect=True)
async def test_a_connection_the_server_closed_is_replaced_at_checkout(pool: DriverPool, database_url: URL) -> None:
    connection = await pool.acquire()
    pid = await backend_pid(connection)
    await pool.release(connection, reusable=True)

    admin = await asyncpg.connect(**url_arguments(database_url))
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    for _ in range(50):  # the client notices the closed socket on its next turn of the event loop
        if connection.is_closed():
            break
        await asyncio.sleep(0.02)

    replacement = await pool.acquire()
    assert await backend_pid(replacement) != pid
    await pool.release(replacement, reusable=True)
    assert pool.opened == 1


def url_arguments(url: URL) -> dict[str, object]:
    url, ssl_arguments = split_sslmode(url)
    _, arguments = url.get_dialect()().create_connect_args(url)
    return {**arguments, **ssl_arguments}


@pytest.mark.parametrize("pool", [1], indirect=True)
async def test_an_idle_connection_is_pinged_and_replaced_when_it_does_not_answer(
    pool: DriverPool, database_url: URL
) -> None:
    pool.idle_ping_seconds = 0  # every checkout pings: as if each connection had sat idle
    connection = await pool.acquire()
    pid = await backend_pid(connection)
    await pool.release(connection, reusable=True)

    async def terminate() -> None:
        admin = await asyncpg.connect(**url_arguments(database_url))
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
        finally:
            await admin.close()

    # Ended by the server from another thread while this event loop stands still, so the pooled connection
    # cannot notice: only the ping at checkout can tell it is dead.
    ender = threading.Thread(target=asyncio.run, args=(terminate(),))
    ender.start()
    ender.join()
    assert not connection.is_closed()

    replacement = await pool.acquire()
    assert await backend_pid(replacement) != pid
    await pool.release(replacement, reusable=True)
    assert pool.opened == 1
