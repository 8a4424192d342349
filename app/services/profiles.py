"""Profiles: one per Supabase user, created on first sign-in with the signup credit grant."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import Queries
from app.errors import AppError
from app.models import CreditEntry, CreditKind, Profile
from app.schemas import ProfileOut

# The signup grant's ledger entry, written the same way by the API and by the optional auth.users trigger.
SIGNUP_REFERENCE = "signup"
SIGNUP_NOTE = "signup grant"

# Fields a user can never set themselves: credits move through the ledger, billing through Stripe.
PROTECTED_FIELDS = frozenset(
    {
        "id",
        "credits",
        "stripe_customer_id",
        "subscription_id",
        "subscription_status",
        "subscription_price_id",
        "subscription_current_period_end",
        "subscription_cancel_at_period_end",
        "subscription_event_at",
        "created_at",
        "updated_at",
    }
)


class ProfileNotFound(AppError):
    status_code = 404
    default_detail = "profile not found: create it with POST /profile"


class ProtectedFields(AppError):
    """The request is well-formed but asks for something a user may not do: 403, not 422."""

    status_code = 403

    def __init__(self, fields: list[str]) -> None:
        super().__init__(f"{', '.join(fields)} cannot be set by a user")


def refuse_protected_fields(data: Any) -> None:
    if isinstance(data, Mapping):
        protected = sorted(PROTECTED_FIELDS.intersection(data))
        if protected:
            raise ProtectedFields(protected)


_PROFILE_COLUMNS = ", ".join(ProfileOut.model_fields)
# Column names come from the schema, never from input.
_READ_SQL = f"SELECT {_PROFILE_COLUMNS} FROM profiles WHERE id = $1"  # noqa: S608
_LOCK_SQL = "SELECT credits FROM profiles WHERE id = $1 FOR UPDATE"


async def read_profile(db: Queries, user_id: UUID) -> ProfileOut | None:
    """The profile as the API shows it (read on every page of the front end)."""
    row = await db.fetchrow(_READ_SQL, user_id)
    return ProfileOut.model_validate(dict(row)) if row is not None else None


async def lock_profile(db: Queries, user_id: UUID) -> int:
    """Serialise changes to one balance until the transaction ends, so an "already done?" check and the change
    cannot interleave with a concurrent request doing the same; the balance, or 404."""
    balance = await db.fetchval(_LOCK_SQL, user_id)
    if balance is None:
        raise ProfileNotFound
    return int(balance)


async def get_or_create_profile(
    session: AsyncSession, user_id: UUID, full_name: str | None, signup_credits: int
) -> tuple[ProfileOut, bool]:
    """The user's profile and whether this call created it (with its signup grant in the ledger).

    `ON CONFLICT DO NOTHING` makes concurrent first sign-ins safe: exactly one insert wins, the others wait
    for it and then read the row it made.
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
                reference=SIGNUP_REFERENCE,
                note=SIGNUP_NOTE,
            )
        )
        return ProfileOut.model_validate(created), True
    existing = await session.scalar(select(Profile).where(Profile.id == user_id))
    if existing is None:  # deleted between the two statements
        raise ProfileNotFound
    return ProfileOut.model_validate(existing), False


async def update_full_name(session: AsyncSession, user_id: UUID, full_name: str | None) -> ProfileOut:
    profile = await session.scalar(
        update(Profile)
        .where(Profile.id == user_id)
        .values(full_name=full_name)
        .returning(Profile)
        .execution_options(populate_existing=True)
    )
    if profile is None:
        raise ProfileNotFound
    return ProfileOut.model_validate(profile)
