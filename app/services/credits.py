"""The credits ledger: every change of a balance is one statement that moves `profiles.credits` and writes
its `credit_entries` row together, so a balance never goes negative, never loses a concurrent update and
always equals the sum of its entries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, NotFound, PaymentRequired
from app.models import CreditEntry, CreditKind, Profile
from app.services.profiles import PROFILE_NOT_FOUND


@dataclass(frozen=True, slots=True)
class LedgerMismatch:
    profile_id: UUID
    balance: int
    ledger_sum: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A ledger row as the API shows it."""

    id: int
    amount: int
    balance_after: int
    kind: str
    reference: str | None
    note: str | None
    created_at: datetime


# Add $2 (negative to take) to the balance and record it, in one statement: nothing when the profile does
# not exist or the balance would go below zero. The UPDATE's row lock serialises moves on one balance.
MOVE_SQL = """
WITH moved AS (
    UPDATE profiles SET credits = credits + $2::integer
    WHERE id = $1 AND credits + $2::integer >= 0
    RETURNING id, credits
)
INSERT INTO credit_entries (profile_id, amount, balance_after, kind, reference, note)
SELECT id, $2::integer, credits, $3::text, $4::text, $5::text FROM moved
RETURNING id, amount, balance_after, kind, reference, note, created_at
"""
_LOCK_SQL = "SELECT credits FROM profiles WHERE id = $1 FOR UPDATE"
_BALANCE_SQL = "SELECT credits FROM profiles WHERE id = $1"
_KEYED_SPEND_SQL = """
SELECT id, amount, balance_after, kind, reference, note, created_at FROM credit_entries
WHERE profile_id = $1 AND kind = 'spend' AND reference = $2
"""


def _not_enough(balance: int, requested: int) -> PaymentRequired:
    return PaymentRequired(
        f"not enough credits: {balance} available, {requested} requested",
        extra={"balance": balance, "requested": requested},
    )


async def spend(
    connection: asyncpg.Connection, user_id: UUID, amount: int, reason: str | None, idempotency_key: str | None
) -> Entry:
    """Take `amount` credits (on the request's driver connection: this is the hot path).

    With an idempotency key, a retry of the same request returns the first entry and charges nothing;
    the same key with a different request is a conflict.
    """
    if idempotency_key is not None:
        # Serialise this user's keyed spends, so "already done?" and "do it" cannot interleave.
        if await connection.fetchval(_LOCK_SQL, user_id) is None:
            raise NotFound(PROFILE_NOT_FOUND)
        earlier = await connection.fetchrow(_KEYED_SPEND_SQL, user_id, idempotency_key)
        if earlier is not None:
            if earlier["amount"] != -amount or earlier["note"] != reason:
                raise Conflict("this Idempotency-Key was already used with a different request")
            return Entry(**earlier)
    moved = await connection.fetchrow(MOVE_SQL, user_id, -amount, CreditKind.SPEND.value, idempotency_key, reason)
    if moved is not None:
        return Entry(**moved)
    balance = await connection.fetchval(_BALANCE_SQL, user_id)
    if balance is None:
        raise NotFound(PROFILE_NOT_FOUND)
    raise _not_enough(balance, amount)


async def _move(
    session: AsyncSession, user_id: UUID, amount: int, kind: CreditKind, reference: str | None, note: str | None
) -> Entry | None:
    """MOVE_SQL inside the session's transaction."""
    connection = await session.connection()
    result = await connection.exec_driver_sql(MOVE_SQL, (user_id, amount, kind.value, reference, note))
    row = result.one_or_none()
    return Entry(**row._asdict()) if row is not None else None


async def _lock_profile(session: AsyncSession, user_id: UUID) -> int:
    """Serialise changes to one balance, so an "already done?" check and the change cannot interleave
    with a concurrent request doing the same; the balance, or 404."""
    balance = await session.scalar(select(Profile.credits).where(Profile.id == user_id).with_for_update())
    if balance is None:
        raise NotFound(PROFILE_NOT_FOUND)
    return balance


async def adjust(session: AsyncSession, user_id: UUID, amount: int, reason: str) -> Entry:
    """A service-role correction, signed, never taking the balance below zero."""
    balance = await _lock_profile(session, user_id)
    entry = await _move(session, user_id, amount, CreditKind.ADJUSTMENT, None, reason)
    if entry is None:
        raise _not_enough(balance, -amount)
    return entry


async def grant(
    session: AsyncSession, user_id: UUID, amount: int, kind: CreditKind, reference: str, note: str | None = None
) -> Entry | None:
    """Credits paid for through Stripe, at most once per (kind, Stripe object id).

    None when that object was already granted. The profile must exist.
    """
    await _lock_profile(session, user_id)
    already = await session.scalar(
        select(CreditEntry.id).where(CreditEntry.kind == kind.value, CreditEntry.reference == reference)
    )
    if already is not None:
        return None
    entry = await _move(session, user_id, amount, kind, reference, note)
    if entry is None:
        raise NotFound(PROFILE_NOT_FOUND)
    return entry


_ENTRIES_SQL = """
SELECT id, amount, balance_after, kind, reference, note, created_at FROM credit_entries
WHERE profile_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3
"""
_NEWEST = 2**63 - 1  # above every entry id: the first page


async def list_entries(connection: asyncpg.Connection, user_id: UUID, limit: int, before: int | None) -> list[Entry]:
    """The user's entries, newest first, starting below the `before` cursor (an entry id)."""
    rows = await connection.fetch(_ENTRIES_SQL, user_id, before or _NEWEST, limit)
    return [Entry(**row) for row in rows]


async def find_ledger_mismatches(session: AsyncSession) -> list[LedgerMismatch]:
    """Every profile whose balance differs from the sum of its ledger entries (none, when all is well)."""
    sums = (
        select(CreditEntry.profile_id, func.sum(CreditEntry.amount).label("total"))
        .group_by(CreditEntry.profile_id)
        .subquery()
    )
    total = func.coalesce(sums.c.total, 0)
    rows = await session.execute(
        select(Profile.id, Profile.credits, total)
        .outerjoin(sums, sums.c.profile_id == Profile.id)
        .where(Profile.credits != total)
        .order_by(Profile.id)
    )
    return [LedgerMismatch(profile_id, balance, int(ledger_sum)) for profile_id, balance, ledger_sum in rows]
