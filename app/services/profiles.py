"""Profiles: one per Supabase user, created on first sign-in with the signup credit grant."""

from __future__ import annotations

from uuid import UUID

import asyncpg
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import NotFound
from app.models import CreditEntry, CreditKind, Profile

PROFILE_NOT_FOUND = "profile not found: create it with POST /profile"


# Column names come from the model, never from input.
_PROFILE_SQL = f"SELECT {', '.join(c.name for c in Profile.__table__.columns)} FROM profiles WHERE id = $1"  # noqa: S608


async def get_profile(connection: asyncpg.Connection, user_id: UUID) -> asyncpg.Record | None:
    """The profile as a plain row (read on every page of the front end)."""
    return await connection.fetchrow(_PROFILE_SQL, user_id)


async def get_or_create_profile(
    session: AsyncSession, user_id: UUID, full_name: str | None, signup_credits: int
) -> tuple[Profile, bool]:
    """The user's profile and whether this call created it (with its signup grant in the ledger).

    `ON CONFLICT DO NOTHING` makes concurrent first sign-ins safe: exactly one insert wins,
    the others wait for it and then read the row it made.
    """
    created = await session.scalar(
        insert(Profile)
        .values(id=user_id, full_name=full_name, credits=signup_credits)
        .on_conflict_do_nothing(index_elements=[Profile.id])
        .returning(Profile)
    )
    if created is not None:
        await session.execute(
            insert(CreditEntry).values(
                profile_id=user_id,
                amount=signup_credits,
                balance_after=signup_credits,
                kind=CreditKind.SIGNUP_GRANT.value,
                note="signup grant",
            )
        )
        return created, True
    existing = await session.scalar(select(Profile).where(Profile.id == user_id))
    if existing is None:  # deleted between the two statements
        raise NotFound(PROFILE_NOT_FOUND)
    return existing, False


async def update_full_name(session: AsyncSession, user_id: UUID, full_name: str | None) -> Profile:
    profile = await session.scalar(
        update(Profile)
        .where(Profile.id == user_id)
        .values(full_name=full_name)
        .returning(Profile)
        .execution_options(populate_existing=True)
    )
    if profile is None:
        raise NotFound(PROFILE_NOT_FOUND)
    return profile
