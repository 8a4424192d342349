"""The credits ledger: every change of a balance is one statement that moves `profiles.credits` and writes
its `credit_entries` row together, so a balance never goes negative, never loses a concurrent update and
always equals the sum of its entries."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import Queries
from app.errors import AppError
from app.models import CreditEntry, CreditKind, Profile
from app.schemas import CreditEntryOut
from app.services.profiles import ProfileNotFound, lock_profile


class InsufficientCredits(AppError):
    status_code = 402

    def __init__(self, balance: int, requested: int) -> None:
        super().__init__(
            f"not enough credits: {balance} available, {requested} requested",
            extra={"balance": balance, "requested": requested},
        )


class IdempotencyConflict(AppError):
    status_code = 409
    default_detail = "this Idempotency-Key was already used with a different request"


@dataclass(frozen=True, slots=True)
class LedgerMismatch:
    profile_id: UUID
    balance: int
    ledger_sum: int


_ENTRY_COLUMNS = ", ".join(CreditEntryOut.model_fields)
# Add $2 (negative to take) to the balance and record it, in one statement: nothing when the profile does
# not exist or the balance would go below zero. The UPDATE's row lock serialises moves on one balance.
_MOVE_SQL = f"""
WITH moved AS (
    UPDATE profiles SET credits = credits + $2::integer
    WHERE id = $1 AND credits + $2::integer >= 0
    RETURNING id, credits
)
INSERT INTO credit_entries (profile_id, amount, balance_after, kind, reference, note)
SELECT id, $2::integer, credits, $3::text, $4::text, $5::text FROM moved
RETURNING {_ENTRY_COLUMNS}
"""  # noqa: S608 - column names from the schema
_BALANCE_SQL = "SELECT credits FROM profiles WHERE id = $1"
_KEYED_SPEND_SQL = f"""
SELECT {_ENTRY_COLUMNS} FROM credit_entries WHERE profile_id = $1 AND kind = 'spend' AND reference = $2
"""  # noqa: S608
_GRANTED_SQL = "SELECT 1 FROM credit_entries WHERE kind = $1 AND reference = $2"
_ENTRIES_SQL = f"""
SELECT {_ENTRY_COLUMNS} FROM credit_entries WHERE profile_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3
"""  # noqa: S608
_NEWEST = 2**63 - 1  # above every entry id: the first page


async def move_balance(
    db: Queries, user_id: UUID, amount: int, kind: CreditKind, reference: str | None, note: str | None
) -> CreditEntryOut | None:
    """Add `amount` (negative: take) and record it; None when the profile is missing or would go below zero."""
    row = await db.fetchrow(_MOVE_SQL, user_id, amount, kind.value, reference, note)
    return CreditEntryOut.model_validate(dict(row)) if row is not None else None


async def spend(
    db: Queries, user_id: UUID, amount: int, reason: str | None, idempotency_key: str | None
) -> CreditEntryOut:
    """Take `amount` credits. With an idempotency key, a retry of the same request returns the first entry and
    charges nothing; the same key with a different request is a conflict."""
    if idempotency_key is not None:
        # Serialise this user's keyed spends, so "already done?" and "do it" cannot interleave.
        await lock_profile(db, user_id)
        earlier = await db.fetchrow(_KEYED_SPEND_SQL, user_id, idempotency_key)
        if earlier is not None:
            if earlier["amount"] != -amount or earlier["note"] != reason:
                raise IdempotencyConflict
            return CreditEntryOut.model_validate(dict(earlier))
    entry = await move_balance(db, user_id, -amount, CreditKind.SPEND, idempotency_key, reason)
    if entry is not None:
        return entry
    balance = await db.fetchval(_BALANCE_SQL, user_id)
    if balance is None:
        raise ProfileNotFound
    raise InsufficientCredits(balance, amount)


async def adjust(db: Queries, user_id: UUID, amount: int, reason: str) -> CreditEntryOut:
    """A service-role correction, signed, never taking the balance below zero."""
    balance = await lock_profile(db, user_id)
    entry = await move_balance(db, user_id, amount, CreditKind.ADJUSTMENT, None, reason)
    if entry is None:
        raise InsufficientCredits(balance, -amount)
    return entry


async def grant(
    db: Queries, user_id: UUID, amount: int, kind: CreditKind, reference: str, note: str | None = None
) -> CreditEntryOut | None:
    """Credits paid for through Stripe, at most once per (kind, Stripe object id); None when that object was
    already granted. The profile must exist."""
    await lock_profile(db, user_id)
    if await db.fetchval(_GRANTED_SQL, kind.value, reference) is not None:
        return None
    entry = await move_balance(db, user_id, amount, kind, reference, note)
    if entry is None:
        raise ProfileNotFound
    return entry


async def list_entries(db: Queries, user_id: UUID, limit: int, before: int | None) -> list[CreditEntryOut]:
    """The user's entries, newest first, starting below the `before` cursor (an entry id)."""
    rows = await db.fetch(_ENTRIES_SQL, user_id, before or _NEWEST, limit)
    return [CreditEntryOut.model_validate(dict(row)) for row in rows]


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
