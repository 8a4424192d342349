"""Alembic environment: runs on a connection handed over by `app.schema.migrate`, or on its own
(the `alembic` CLI) against the configured database, the embedded one included."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from app.models import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    from app.config import load_settings
    from app.database import create_engine, resolve_database_url

    settings = load_settings()
    engine = create_engine(settings, await asyncio.to_thread(resolve_database_url, settings))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")

handed_over = context.config.attributes.get("connection")
if handed_over is not None:
    _run(handed_over)
else:
    asyncio.run(_run_standalone())
