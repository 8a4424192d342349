"""Migrations: they build exactly the models' schema, and the ledger migration keeps existing balances."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from app.models import Base
from app.schema import migrate
from app.services.credits import find_ledger_mismatches
from tests.conftest import throwaway_database


@pytest.fixture
async def empty_engine(server_url: URL) -> AsyncIterator[AsyncEngine]:
    async with throwaway_database(server_url, "migrations") as url:
        engine = create_async_engine(url)
        yield engine
        await engine.dispose()


async def test_migrations_match_the_models(empty_engine: AsyncEngine) -> None:
    await migrate(empty_engine)

    def differences(connection: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    async with empty_engine.connect() as connection:
        assert await connection.run_sync(differences) == []


async def test_ledger_migration_opens_every_existing_balance(empty_engine: AsyncEngine) -> None:
    await migrate(empty_engine, "0001")
    ids = [uuid.uuid4() for _ in range(3)]
    async with empty_engine.begin() as connection:
        for user_id, credits in zip(ids, (1000, 0, 42), strict=True):
            await connection.execute(
                text("INSERT INTO profiles (id, credits) VALUES (:id, :credits)"), {"id": user_id, "credits": credits}
            )
    await migrate(empty_engine)
    await migrate(empty_engine)  # a second run changes nothing
    async with AsyncSession(empty_engine) as session:
        assert await find_ledger_mismatches(session) == []
        rows = (await session.execute(text("SELECT profile_id, amount, kind FROM credit_entries"))).all()
    assert sorted((row.amount, row.kind) for row in rows) == [
        (0, "adjustment"),
        (42, "adjustment"),
        (1000, "adjustment"),
    ]


async def test_signup_grants_made_before_0005_get_the_shared_reference(empty_engine: AsyncEngine) -> None:
    await migrate(empty_engine, "0004")
    user_id = uuid.uuid4()
    async with empty_engine.begin() as connection:
        await connection.execute(text("INSERT INTO profiles (id, credits) VALUES (:id, 1000)"), {"id": user_id})
        await connection.execute(
            text(
                "INSERT INTO credit_entries (profile_id, amount, balance_after, kind, note) "
                "VALUES (:id, 1000, 1000, 'signup_grant', 'signup grant')"
            ),
            {"id": user_id},
        )
    await migrate(empty_engine)
    async with empty_engine.connect() as connection:
        row = (await connection.execute(text("SELECT reference, note FROM credit_entries"))).one()
    assert tuple(row) == ("signup", "signup grant")
