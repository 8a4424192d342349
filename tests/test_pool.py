"""The hot paths' pool (asyncpg's own, as configured in app/database.py) against the real server: bounded,
self-healing, with one deadline per checkout, idle connections recycled, and a shutdown that waits."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from fastapi import APIRouter
from sqlalchemy.engine import URL

from app.application import create_app
from app.config import split_sslmode
from app.database import HotPool, checkout, close_driver_pool, driver_transaction, open_driver_pool, release
from app.deps import Db, check_db_routes
from app.errors import DatabaseBusy, DatabaseUnavailable
from tests.conftest import make_settings


def url_arguments(url: URL) -> dict[str, Any]:
    url, ssl_arguments = split_sslmode(url)
    _, arguments = url.get_dialect()().create_connect_args(url)
    return {**arguments, **ssl_arguments}


@contextlib.asynccontextmanager
async def driver_pool(url: URL, tmp_path: Path, **settings: Any) -> AsyncIterator[HotPool]:
    values = {"db_pool_size": 2, "db_pool_timeout": 5, **settings}
    pool = await open_driver_pool(make_settings(url, tmp_path, **values), url)
    try:
        yield pool
    finally:
        await close_driver_pool(pool, 2)


async def backend_pid(connection: asyncpg.Connection) -> int:
    pid: int = await connection.fetchval("SELECT pg_backend_pid()")
    return pid


async def terminate_backend(url: URL, pid: int) -> None:
    admin = await asyncpg.connect(**url_arguments(url))
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
    finally:
        await admin.close()


async def test_more_checkouts_than_connections_are_all_served_by_at_most_the_pool_size(
    database_url: URL, tmp_path: Path
) -> None:
    async with driver_pool(database_url, tmp_path, db_pool_size=3) as pool:

        async def one_request() -> int:
            async with driver_transaction(pool, read_only=False) as connection:
                await connection.execute("SELECT pg_sleep(0.01)")
                return await backend_pid(connection)

        pids = await asyncio.gather(*(one_request() for _ in range(30)))
        assert len(pids) == 30
        assert len(set(pids)) <= 3
        assert pool.pool.get_size() <= 3


async def failing_request(pool: HotPool, used: list[int], error: Exception) -> None:
    async with driver_transaction(pool, read_only=False) as connection:
        used.append(await backend_pid(connection))
        raise error


async def test_a_request_that_failed_mid_protocol_never_returns_its_connection(
    database_url: URL, tmp_path: Path
) -> None:
    async with driver_pool(database_url, tmp_path, db_pool_size=1) as pool:
        used: list[int] = []
        with pytest.raises(RuntimeError):
            await failing_request(pool, used, RuntimeError("not one of our answers: the connection's state is unknown"))
        async with driver_transaction(pool, read_only=True) as connection:
            assert await backend_pid(connection) != used[0]


async def test_our_own_answers_keep_the_connection(database_url: URL, tmp_path: Path) -> None:
    async with driver_pool(database_url, tmp_path, db_pool_size=1) as pool:
        used: list[int] = []
        with pytest.raises(DatabaseUnavailable):  # any AppError: a 4xx or 5xx we chose
            await failing_request(pool, used, DatabaseUnavailable())
        async with driver_transaction(pool, read_only=True) as connection:
            assert await backend_pid(connection) == used[0]


async def test_a_connection_the_server_closed_is_replaced_at_checkout(database_url: URL, tmp_path: Path) -> None:
    async with driver_pool(database_url, tmp_path, db_pool_size=1) as pool:
        async with driver_transaction(pool, read_only=True) as connection:
            pid = await backend_pid(connection)
        await terminate_backend(database_url, pid)
        await asyncio.sleep(0.2)  # the client notices the closed socket on a later turn of the event loop
        async with driver_transaction(pool, read_only=True) as replacement:
            assert await backend_pid(replacement) != pid


@pytest.mark.parametrize("ping", [True, False], ids=["pinged", "not-pinged"])
async def test_an_idle_connection_is_pinged_and_replaced_when_it_does_not_answer(
    database_url: URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ping: bool
) -> None:
    # As if every connection had sat idle (pinged), or none ever had (not pinged: shows what the ping prevents).
    monkeypatch.setattr("app.database.IDLE_PING_SECONDS", 0.0 if ping else 3600.0)
    async with driver_pool(database_url, tmp_path, db_pool_size=1) as pool:
        async with driver_transaction(pool, read_only=True) as connection:
            pid = await backend_pid(connection)
        # Ended by the server from another thread while this event loop stands still, so the pooled connection
        # cannot notice: only a ping at checkout can tell it is dead.
        ender = threading.Thread(target=asyncio.run, args=(terminate_backend(database_url, pid),))
        ender.start()
        ender.join()
        if ping:
            async with driver_transaction(pool, read_only=True) as replacement:
                assert await backend_pid(replacement) != pid
        else:
            with pytest.raises(DatabaseUnavailable):
                async with driver_transaction(pool, read_only=True) as stale:
                    await backend_pid(stale)


class FreezableProxy:
    """A TCP relay to PostgreSQL that can stop relaying, as a network that drops packets silently does."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        socket_dir = self.url.query.get("host")
        port = self.url.port or 5432
        if isinstance(socket_dir, str) and socket_dir.startswith("/"):  # the embedded server: a Unix socket
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
        else:
            upstream_reader, upstream_writer = await asyncio.open_connection(self.url.host, port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if self.frozen.is_set():
                        await asyncio.Event().wait()  # hold everything from now on, answer nothing
                    sink.write(data)
                    await sink.drain()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_one_deadline_bounds_pings_and_reconnects_together(
    database_url: URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a network that stops answering, a checkout gives up after DB_POOL_TIMEOUT in all: not one ping timeout,
    then one connect timeout, then another ping..."""
    monkeypatch.setattr("app.database.IDLE_PING_SECONDS", 0.0)
    proxy = FreezableProxy(database_url)
    query = {key: value for key, value in database_url.query.items() if key != "host"}
    proxied = database_url.set(host="127.0.0.1", port=await proxy.start(), query=query)
    try:
        async with driver_pool(proxied, tmp_path, db_pool_size=1, db_pool_timeout=1, db_connect_timeout=30) as pool:
            async with driver_transaction(pool, read_only=True) as connection:
                await backend_pid(connection)
            proxy.frozen.set()
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                await checkout(pool)
            assert time.monotonic() - started < 2
    finally:
        await proxy.close()


async def test_idle_connections_are_closed_after_their_lifetime(database_url: URL, tmp_path: Path) -> None:
    async with driver_pool(database_url, tmp_path, db_pool_size=2, db_pool_idle_lifetime=0.2) as pool:
        async with driver_transaction(pool, read_only=True) as connection:
            pid = await backend_pid(connection)
        assert pool.pool.get_size() == 1
        await asyncio.sleep(0.6)
        assert pool.pool.get_idle_size() == 0
        async with driver_transaction(pool, read_only=True) as connection:
            assert await backend_pid(connection) != pid


async def test_shutdown_waits_for_checkouts_in_flight_and_refuses_new_ones(database_url: URL, tmp_path: Path) -> None:
    pool = await open_driver_pool(make_settings(database_url, tmp_path, db_pool_size=2), database_url)
    finished = asyncio.Event()

    async def slow_request() -> None:
        async with driver_transaction(pool, read_only=False) as connection:
            await connection.execute("SELECT pg_sleep(0.3)")
        finished.set()

    request = asyncio.create_task(slow_request())
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(close_driver_pool(pool, 5))
    await asyncio.sleep(0.05)
    with pytest.raises(DatabaseUnavailable):  # a checkout arriving meanwhile is a 503, not a hang
        await checkout(pool)
    await closing
    assert finished.is_set()  # the request in flight completed before the pool closed
    await request


async def test_shutdown_gives_up_on_a_stuck_checkout_after_its_grace(database_url: URL, tmp_path: Path) -> None:
    pool = await open_driver_pool(make_settings(database_url, tmp_path, db_pool_size=1), database_url)
    stuck = await checkout(pool)
    pid = await backend_pid(stuck)
    started = time.monotonic()
    await close_driver_pool(pool, 0.3)
    assert time.monotonic() - started < 2
    admin = await asyncpg.connect(**url_arguments(database_url))
    try:
        for _ in range(50):  # the server sees the socket close a moment later
            if not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                break
            await asyncio.sleep(0.02)
        assert not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
    finally:
        await admin.close()


def test_a_route_taking_db_outside_a_db_route_stops_start_up(database_url: URL, tmp_path: Path) -> None:
    """Its connection would never go back to the pool: the app refuses to start rather than leak."""
    stray = APIRouter()

    @stray.get("/stray")
    async def stray_route(db: Db) -> None:
        pass

    application = create_app(make_settings(database_url, tmp_path))
    application.router.routes.extend(stray.routes)
    with pytest.raises(RuntimeError, match="/stray takes Db"):
        check_db_routes(application.routes)


async def test_checkouts_count_what_they_take_and_give_back(database_url: URL, tmp_path: Path) -> None:
    """The count behind the fast path (a free connection known without walking the pool) never drifts: after
    requests that succeed, fail cleanly, fail mid-protocol and time out waiting, it is back at zero."""
    async with driver_pool(database_url, tmp_path, db_pool_size=1, db_pool_timeout=0.3) as pool:
        held = await checkout(pool)
        with pytest.raises(DatabaseBusy):
            await checkout(pool)  # the only connection is taken: waits its deadline
        await release(pool, held)
        used: list[int] = []
        for error in (DatabaseUnavailable(), RuntimeError("mid-protocol")):
            with pytest.raises(type(error)):
                await failing_request(pool, used, error)
        await asyncio.gather(*(pool_request(pool) for _ in range(10)))
        assert pool.taken == 0


async def pool_request(pool: HotPool) -> None:
    async with driver_transaction(pool, read_only=True) as connection:
        await connection.execute("SELECT pg_sleep(0.01)")
