"""Connections: SQLAlchemy's engine and sessions, asyncpg's pool for the hot paths, and the request's transaction
on either. Migrations: app/schema.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, cast
from uuid import uuid4

import asyncpg
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry

from app.config import Settings, split_sslmode
from app.embedded import start_embedded_postgres
from app.errors import AppError, DatabaseBusy, DatabaseUnavailable, is_connection_failure
from app.metrics import observe_pool_wait

logger = logging.getLogger(__name__)

# A pooled connection unused for longer than this is pinged before use: one the network lost silently
# (no FIN, no RST) would otherwise fail the request that draws it. One in constant use is known to be alive.
IDLE_PING_SECONDS = 2.0


def resolve_database_url(settings: Settings) -> URL:
    """The configured database, or the embedded one outside production."""
    if settings.database_configured:
        return settings.database_url_object
    if settings.is_production:  # Settings already refuses this; never start a local server in production.
        raise RuntimeError("no database configured in production")
    return start_embedded_postgres(settings.data_dir)


def connect_arguments(settings: Settings, url: URL) -> tuple[URL, dict[str, Any]]:
    """The URL without `sslmode`, and the arguments for `asyncpg.connect` that both pools share."""
    url, arguments = split_sslmode(url)
    arguments["timeout"] = settings.db_connect_timeout
    server_settings = {"application_name": "picads-backend"}
    if settings.db_statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
    arguments["server_settings"] = server_settings
    if settings.pooler_mode_for(url):
        # A transaction pooler hands each transaction to any server connection, where our named
        # prepared statements do not exist: no statement cache.
        arguments["statement_cache_size"] = 0
    return url, arguments


# --- SQLAlchemy: the ORM sessions -----------------------------------------------------------------------------


def create_engine(settings: Settings, url: URL) -> AsyncEngine:
    """The engine behind the ORM sessions (profile changes, billing, admin), pooled up to DB_SESSION_POOL_SIZE."""
    url, arguments = connect_arguments(settings, url)
    if settings.pooler_mode_for(url):  # SQLAlchemy's own statement cache, and unique statement names
        arguments["prepared_statement_cache_size"] = 0
        arguments["prepared_statement_name_func"] = lambda: f"__asyncpg_{uuid4()}__"
    engine = create_async_engine(
        url,
        poolclass=SessionPool,
        pool_size=settings.db_session_pool_size,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout,
        connect_args=arguments,
        # A failed statement's error names the statement, not what was in it (names, reasons, emails): error
        # reports and tracebacks in the log carry no user data.
        hide_parameters=True,
    )
    _ping_idle_connections(engine)
    return engine


class SessionPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's pool for asyncio, timing the checkouts that find every connection in use (for the metrics)."""

    def _do_get(self) -> ConnectionPoolEntry:
        if self.checkedin() or self.checkedout() < self.size():  # no overflow: its size is its most
            return super()._do_get()
        started = time.monotonic()
        try:
            return super()._do_get()
        finally:
            observe_pool_wait("sqlalchemy", time.monotonic() - started)


# Its log is SQLAlchemy's pool log under another name: quiet unless asked for, as SQLAlchemy keeps its own.
logging.getLogger(f"{SessionPool.__module__}.{SessionPool.__name__}").setLevel(logging.WARNING)


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """`pool_pre_ping`, but only for connections that sat idle (see IDLE_PING_SECONDS)."""

    @event.listens_for(engine.sync_engine, "checkin")
    def _checked_in(_: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: ConnectionPoolEntry, _: Any) -> None:
        if record.driver_connection is not None and record.driver_connection.is_closed():
            # The server ended it (a restart, an idle timeout): known without asking.
            raise DisconnectionError("pooled connection was closed by the server")
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool replaces it and tries again
            raise DisconnectionError("stale pooled connection") from exc


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def session_transaction(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """The request's one transaction: committed when the route returns (before the response is sent),
    rolled back on any exception. Services only flush."""
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


class Queries(Protocol):
    """What the services need of a connection: an asyncpg connection has it, and so does SessionQueries."""

    async def fetch(self, query: str, *args: object) -> Sequence[Mapping[str, Any]]: ...

    async def fetchrow(self, query: str, *args: object) -> Mapping[str, Any] | None: ...

    async def fetchval(self, query: str, *args: object) -> Any: ...


class SessionQueries:
    """A session's connection spoken to as asyncpg speaks ($1 parameters, rows by column name), inside the
    session's transaction: the statements both kinds of connection run are written once (services/queries)."""

    __slots__ = ("session",)

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def fetch(self, query: str, *args: object) -> Sequence[Mapping[str, Any]]:
        connection = await self.session.connection()
        rows = (await connection.exec_driver_sql(query, args)).mappings().all()
        return cast(Sequence[Mapping[str, Any]], rows)  # keyed by column name: these are plain SQL statements

    async def fetchrow(self, query: str, *args: object) -> Mapping[str, Any] | None:
        rows = await self.fetch(query, *args)
        return rows[0] if rows else None

    async def fetchval(self, query: str, *args: object) -> Any:
        row = await self.fetchrow(query, *args)
        return next(iter(row.values())) if row is not None else None


# --- asyncpg: the hot paths -----------------------------------------------------------------------------------


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, knowing when it was last put back in the pool (for the idle ping)."""

    __slots__ = ("released_at",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.released_at = time.monotonic()


class BalanceBusy(AppError):
    """Waited DB_LOCK_TIMEOUT_MS for a balance other requests are changing: nothing was written, try again."""

    status_code = 429
    default_detail = "this balance is busy with other requests: nothing was changed, try again in a moment"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


class StaleConnection(Exception):
    """An idle pooled connection did not answer its ping; asyncpg closed it, and a checkout tries again."""


@dataclass(slots=True)
class HotPool:
    """asyncpg's pool for the hot paths, with the one deadline a checkout waits within, and how many checkouts
    hold (or are taking) its connections: a free one is then known without asyncpg's count of its idle
    connections, which walks them all."""

    pool: asyncpg.Pool
    max_wait: float
    # The loop the pool belongs to: its clock is read on every checkout, without looking the loop up (which on
    # Python 3.11 asks the kernel for the process id each time).
    loop: asyncio.AbstractEventLoop
    taken: int = 0


async def open_driver_pool(settings: Settings, url: URL) -> HotPool:
    """asyncpg's pool for the hot paths: up to DB_POOL_SIZE connections, opened on demand (so the app starts
    while the database is still down), closed after DB_POOL_IDLE_LIFETIME unused."""
    url, arguments = connect_arguments(settings, url)
    _, from_url = url.get_dialect()().create_connect_args(url)  # host, port, user, password, database
    # A connect or a ping never outlasts a checkout's deadline on its own.
    ping_timeout = arguments["timeout"] = min(settings.db_connect_timeout, settings.db_pool_timeout)
    if settings.db_lock_timeout_ms:
        # A request queued on a balance's row lock holds a pooled connection meanwhile: not for long.
        arguments["server_settings"] = {
            **arguments["server_settings"],
            "lock_timeout": str(settings.db_lock_timeout_ms),
        }

    async def ping_if_idle(connection: PooledConnection) -> None:
        if time.monotonic() - connection.released_at < IDLE_PING_SECONDS:
            return
        try:
            await connection.execute("SELECT 1", timeout=ping_timeout)
        except BaseException as exc:  # a cancelled ping too: asyncpg would then wait to close it gracefully
            connection.terminate()
            if isinstance(exc, Exception):
                raise StaleConnection from exc
            raise

    async def mark_released(connection: PooledConnection) -> None:
        # Instead of asyncpg's default reset (RESET ALL, UNLISTEN, CLOSE ALL, advisory unlocks: one round trip
        # per request): our statements leave no session state behind, and asyncpg itself rolls back an open
        # transaction before calling this.
        connection.released_at = time.monotonic()

    pool = await asyncpg.create_pool(
        **{**from_url, **arguments},
        min_size=0,
        max_size=settings.db_pool_size,
        max_inactive_connection_lifetime=settings.db_pool_idle_lifetime,
        connection_class=PooledConnection,
        setup=ping_if_idle,
        reset=mark_released,
    )
    return HotPool(pool, settings.db_pool_timeout, asyncio.get_running_loop())


async def checkout(hot: HotPool) -> asyncpg.Connection:
    """A connection from the pool within one deadline for waiting, connecting and pinging; else 503.

    While a connection is free nothing waits, and its one ping or reconnect has its own timeout within the
    deadline: the deadline's timer is only armed when that fails or every connection is taken."""
    pool, loop = hot.pool, hot.loop
    deadline = loop.time() + hot.max_wait
    hot.taken += 1
    try:
        if hot.taken <= pool.get_max_size():
            try:
                return await pool.acquire()
            except StaleConnection:
                pass  # its slot is free again: wait for another within what is left of the deadline
        # Every connection taken: this checkout waits for one (timed, for the metrics).
        waiting_since = loop.time() if hot.taken > pool.get_max_size() else None
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        return await pool.acquire()
                    except StaleConnection:
                        continue
        finally:
            if waiting_since is not None:
                observe_pool_wait("asyncpg", loop.time() - waiting_since)
    except BaseException as exc:
        hot.taken -= 1
        if not isinstance(exc, Exception):
            raise
        # The deadline passed with every connection open and in use: busy (while connecting: unreachable).
        if isinstance(exc, TimeoutError) and pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size():
            logger.warning(
                "database busy: all %d pooled connections stayed in use for %gs", pool.get_size(), hot.max_wait
            )
            raise DatabaseBusy from exc
        if is_connection_failure(exc) or isinstance(exc, asyncpg.InterfaceError):  # incl. "pool is closing"
            raise DatabaseUnavailable from exc
        raise


async def release(hot: HotPool, connection: asyncpg.Connection) -> None:
    try:
        await hot.pool.release(connection)
    finally:
        hot.taken -= 1


# Answers we chose (402, 404, 422...) and errors PostgreSQL reported: the connection is still in a known state
# (its transaction was rolled back) and can serve the next request.
_CLEAN_FAILURES = (AppError, HTTPException, RequestValidationError, asyncpg.PostgresError)


class driver_transaction:
    """The request's driver connection, with the session's contract: one transaction, committed when the route
    returns (before the response is sent) and rolled back on any error. Reads run without one (two round trips
    fewer). A request that failed any other way (mid-protocol, cancelled) never returns its connection.

    A class rather than an @asynccontextmanager generator: it runs on every hot-path request (docs/benchmarks.md)."""

    __slots__ = ("connection", "hot", "read_only", "transaction")

    def __init__(self, hot: HotPool, *, read_only: bool) -> None:
        self.hot = hot
        self.read_only = read_only
        self.transaction: Any = None

    async def __aenter__(self) -> Any:
        self.connection = await checkout(self.hot)
        if not self.read_only:
            try:
                self.transaction = self.connection.transaction()
                await self.transaction.start()
            except BaseException as exc:
                await self._give_back(exc)
                raise
        return self.connection

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        failure = exc
        if self.transaction is not None:
            try:
                if exc is None:
                    await self.transaction.commit()
                else:
                    await self.transaction.rollback()
            except BaseException as ended:  # as in `async with transaction`: this error replaces the request's
                failure = ended
        await self._give_back(failure)
        if failure is not None and failure is not exc:
            raise failure

    async def _give_back(self, failure: BaseException | None) -> None:
        """Back to the pool when in a known state; otherwise closed. The failure, said as what it means."""
        connection = self.connection
        reusable = failure is None
        lost = False
        if isinstance(failure, Exception):
            # Lost even between two statements, which asyncpg reports as a protocol error on the next one.
            lost = is_connection_failure(failure) or not _still_open(connection)
            reusable = not lost and isinstance(failure, _CLEAN_FAILURES)
        try:
            if not reusable and _still_open(connection):
                connection.terminate()
        finally:
            await release(self.hot, connection)
        if lost:
            raise DatabaseUnavailable from failure
        if isinstance(failure, asyncpg.LockNotAvailableError):
            raise BalanceBusy from failure


def _still_open(connection: asyncpg.Connection) -> bool:
    try:
        return not connection.is_closed()
    except asyncpg.InterfaceError:  # closed, and already taken back from its proxy by the pool
        return False


async def close_driver_pool(hot: HotPool, grace: float) -> None:
    """Wait up to `grace` seconds for checkouts in flight to come back, then close every connection; a
    checkout arriving meanwhile gets a 503."""
    try:
        await asyncio.wait_for(hot.pool.close(), grace)
    except TimeoutError:
        logger.warning("database connections still in use after %gs at shutdown: closed", grace)
        hot.pool.terminate()
