"""Profiles: one per Supabase user, created on first sign-in with the signup credit grant."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import User
from app.config import SignupGrants
from app.database import Queries, SessionQueries
from app.errors import AppError
from app.metrics import count_credits
from app.models import CreditEntry, CreditKind, Profile
from app.schemas import ProfileOut

# The signup grant's ledger entry, written the same way by the API and by the optional auth.users trigger.
SIGNUP_REFERENCE = "signup"
SIGNUP_NOTE = "signup grant"
ANONYMOUS_NOTE = "anonymous sign-in grant"

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


_COMPUTED = {"held", "available", "anonymous"}
_COLUMNS = ", ".join(f"p.{name}" for name in ProfileOut.model_fields if name not in _COMPUTED)
_SELECT = f"SELECT {_COLUMNS}, p.signup_pending IS NOT NULL AS anonymous"
# Most profiles hold nothing (profiles.held, the sum of their active holds, is 0), and every page of the front end
# reads this: one plain row. A profile holding something is read again with what still counts as held: the active
# holds not yet past their expiry (an expired one stops counting at once, marked or not).
_READ_SQL = f"{_SELECT}, p.held, p.credits - p.held AS available FROM profiles p WHERE p.id = $1"
_READ_HOLDING_SQL = f"""
{_SELECT}, h.held, p.credits - h.held AS available
FROM profiles p, LATERAL (
    SELECT coalesce(sum(amount), 0)::bigint AS held FROM credit_holds
    WHERE profile_id = p.id AND state = 'active' AND expires_at > now()
) h
WHERE p.id = $1
"""  # noqa: S608 - column names from the schema
_LOCK_SQL = "SELECT credits FROM profiles WHERE id = $1 FOR UPDATE"
# The signup grant an anonymous profile was waiting for, once its user has a permanent account (with its email).
_CONVERT_SQL = """
WITH converted AS (
    UPDATE profiles p SET credits = p.credits + w.pending, signup_pending = NULL, email = coalesce($4, p.email)
    FROM (SELECT signup_pending AS pending FROM profiles WHERE id = $1 FOR UPDATE) w
    WHERE p.id = $1 AND w.pending IS NOT NULL
    RETURNING p.id, p.credits, w.pending
)
INSERT INTO credit_entries (profile_id, amount, balance_after, kind, reference, note)
SELECT id, pending, credits, 'signup_grant', $2, $3 FROM converted
RETURNING amount
"""


async def read_profile(db: Queries, user: User) -> ProfileOut | None:
    """The profile as the API shows it (read on every page of the front end). An anonymous profile whose user now
    signs in with a permanent account gets its signup grant first."""
    row = await _profile_row(db, user.id)
    if row is not None and row["anonymous"] and not user.anonymous:
        granted = await db.fetchval(_CONVERT_SQL, user.id, SIGNUP_REFERENCE, SIGNUP_NOTE, _email(user))
        if granted is not None:
            count_credits(CreditKind.SIGNUP_GRANT.value, granted)
        row = await _profile_row(db, user.id)
    return ProfileOut.model_validate(dict(row)) if row is not None else None


async def _profile_row(db: Queries, user_id: UUID) -> Mapping[str, Any] | None:
    row = await db.fetchrow(_READ_SQL, user_id)
    if row is not None and row["held"]:
        row = await db.fetchrow(_READ_HOLDING_SQL, user_id)
    return row


def _email(user: User) -> str | None:
    """The token's email as stored for support's lookups: in lower case, as Supabase keeps it."""
    return user.email.lower() if user.email else None


async def lock_profile(db: Queries, user_id: UUID) -> int:
    """Serialise changes to one balance until the transaction ends, so an "already done?" check and the change
    cannot interleave with a concurrent request doing the same; the balance, or 404."""
    balance = await db.fetchval(_LOCK_SQL, user_id)
    if balance is None:
        raise ProfileNotFound
    return int(balance)


async def get_or_create_profile(
    session: AsyncSession, user: User, full_name: str | None, grants: SignupGrants
) -> tuple[ProfileOut, bool]:
    """The user's profile and whether this call created it, with its signup grant in the ledger (an anonymous
    user's smaller one: the full grant follows with a permanent account).

    `ON CONFLICT DO NOTHING` makes concurrent first sign-ins safe: exactly one insert wins, the others wait
    for it and then read the row it made.
    """
    credits = grants.anonymous if user.anonymous else grants.signup
    pending = grants.signup if user.anonymous else None
    email = _email(user)
    created = await session.scalar(
        insert(Profile)
        .values(id=user.id, full_name=full_name, credits=credits, signup_pending=pending, email=email)
        .on_conflict_do_nothing(index_elements=[Profile.id])
        .returning(Profile.id)
    )
    if created is None and email is not None:  # made by the signup trigger, or before emails were kept
        await session.execute(
            update(Profile).where(Profile.id == user.id, Profile.email.is_distinct_from(email)).values(email=email)
        )
    if created is not None and (credits or not user.anonymous):
        kind = CreditKind.ANONYMOUS_GRANT if user.anonymous else CreditKind.SIGNUP_GRANT
        await session.execute(
            insert(CreditEntry).values(
                profile_id=user.id,
                amount=credits,
                balance_after=credits,
                kind=kind.value,
                reference=SIGNUP_REFERENCE,
                note=SIGNUP_NOTE if kind is CreditKind.SIGNUP_GRANT else ANONYMOUS_NOTE,
            )
        )
        count_credits(kind.value, credits)
    profile = await read_profile(SessionQueries(session), user)
    if profile is None:  # deleted between the two statements
        raise ProfileNotFound
    return profile, created is not None


async def profile_by_id(db: Queries, user_id: UUID) -> ProfileOut | None:
    """Any user's profile as the API shows it (for support)."""
    row = await _profile_row(db, user_id)
    return ProfileOut.model_validate(dict(row)) if row is not None else None


async def update_full_name(session: AsyncSession, user_id: UUID, full_name: str | None) -> ProfileOut:
    updated = await session.scalar(
        update(Profile).where(Profile.id == user_id).values(full_name=full_name).returning(Profile.id)
    )
    row = await _profile_row(SessionQueries(session), user_id) if updated is not None else None
    if row is None:
        raise ProfileNotFound
    return ProfileOut.model_validate(dict(row))
