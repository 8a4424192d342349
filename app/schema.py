"""The database's schema revision against the code's: Alembic's head, where the database stands, what to do
when the two differ (at start-up, in /health, in create_tables.py), and applying the migrations."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.errors import ServiceUnavailable, StartupError

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# `poetry run dev` sets this for its server processes: the head revision when it started. A revision written
# while it runs is never applied by a reload, only by `alembic upgrade head` after its review.
MIGRATE_UP_TO_VARIABLE = "PICADS_MIGRATE_UP_TO"
# Any fixed number; it keeps two deploys (or two dev processes) from migrating at once.
MIGRATION_LOCK_ID = 0x70696361


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@cache
def migration_scripts() -> ScriptDirectory:
    """The migrations of this code, read once per process: the code does not change under a running server."""
    return ScriptDirectory.from_config(alembic_config())


def code_head() -> str:
    head = migration_scripts().get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS}")
    return head


@cache
def known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in migration_scripts().walk_revisions())


def includes(database_revision: str, target: str) -> bool:
    """Whether a database at `database_revision` already has `target` applied (it is that one or a later one)."""
    return any(script.revision == target for script in migration_scripts().iterate_revisions(database_revision, "base"))


def next_revision_id() -> str:
    """The next number in the migrations' numbering: 0006 after 0005."""
    numbers = [int(script.revision) for script in migration_scripts().walk_revisions() if script.revision.isdigit()]
    return f"{max(numbers, default=0) + 1:04d}"


class SchemaBehind(ServiceUnavailable):
    """The code needs migrations the database does not have yet (a deploy that started the code first)."""


@dataclass(frozen=True, slots=True)
class SchemaState:
    # What alembic_version holds: empty for a database never migrated.
    revisions: tuple[str, ...]
    head: str

    @property
    def unknown(self) -> str | None:
        return next((revision for revision in self.revisions if revision not in known_revisions()), None)

    @property
    def current(self) -> bool:
        return self.revisions == (self.head,)

    @property
    def behind(self) -> bool:
        return not self.current and self.unknown is None

    @property
    def where(self) -> str:
        return f"revision {', '.join(self.revisions)}" if self.revisions else "no revision (an empty database)"

    def unknown_message(self) -> str:
        return (
            f"the database is at revision {self.unknown}, which this code does not have (a migration file deleted, "
            "or written on another branch): restore that file, or make the database forget that revision with "
            "`poetry run alembic stamp --purge head` (what it changed stays in the database)"
        )

    def behind_message(self) -> str:
        return (
            f"the database is at {self.where} and this code needs revision {self.head}: apply the migrations "
            "with `python create_tables.py` (in development: `poetry run alembic upgrade head`)"
        )


async def read_schema_state(connection: AsyncConnection) -> SchemaState:
    """The revisions recorded in alembic_version: two catalog-sized queries (what /health runs)."""
    if not await connection.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL")):
        return SchemaState((), code_head())  # never migrated
    rows = await connection.scalars(text("SELECT version_num FROM alembic_version ORDER BY 1"))
    return SchemaState(tuple(rows), code_head())


async def schema_state(engine: AsyncEngine) -> SchemaState | None:
    """Where the database stands, or None when it cannot be reached."""
    try:
        async with engine.connect() as connection:
            return await read_schema_state(connection)
    except Exception:  # any failure to reach the database means "down" here
        logger.warning("database check failed", exc_info=False)
        return None


async def refuse_a_mismatched_schema(engine: AsyncEngine) -> None:
    """Production start-up: never serve a schema the code does not match. An unreachable database is not a
    reason to stay down: /health answers 503 until it is back (and reports a schema behind, then)."""
    state = await schema_state(engine)
    if state is None:
        return
    if state.unknown is not None:
        raise StartupError(state.unknown_message())
    if state.behind:
        raise StartupError(state.behind_message())


async def migrate(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Apply every Alembic migration not yet applied, up to `revision` (`alembic upgrade head`), under an
    advisory lock. A database at a revision this code does not have is refused with the way out. Returns the
    revision the database was at (None: empty), read under the lock: with several deploys starting together, only
    the one that migrated sees the old revision."""

    def upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with engine.begin() as connection:
        await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        state = await read_schema_state(connection)
        if state.unknown is not None:
            raise StartupError(state.unknown_message())
        before = ", ".join(sorted(state.revisions)) or None
        if revision != "head" and any(includes(applied, revision) for applied in state.revisions):
            return before  # already there or further (a reviewed revision applied by hand)
        # A migration waiting for a table lock would queue every request of the running app behind it:
        # give up instead (the deploy fails and can be retried), never stall the service.
        await connection.execute(text("SET LOCAL lock_timeout = '10s'"))
        await connection.run_sync(upgrade)
        return before
