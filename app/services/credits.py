"""The credits ledger: every change of a balance is one statement that moves `profiles.credits` and writes its
`credit_entries` row together, so a balance never loses a concurrent update and always equals the sum of its
entries. Spends and adjustments never take it below what is held; only a take-back (a refund or dispute of
credits already spent) may leave it negative, and later grants repay that debt simply by adding to it."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import Queries
from app.errors import AppError
from app.metrics import count_credits
from app.models import CreditEntry, CreditHold, CreditKind, Profile
from app.schemas import BalanceOut, CreditEntryOut
from app.services.profiles import ProfileNotFound, lock_profile


class InsufficientCredits(AppError):
    status_code = 402

    def __init__(self, balance: BalanceOut, requested: int) -> None:
        super().__init__(
            f"not enough credits: {balance.available} available, {requested} requested",
            extra={
                "balance": balance.credits,
                "held": balance.held,
                "available": balance.available,
                "requested": requested,
            },
        )


class ReservedKey(AppError):
    status_code = 422
    default_detail = "Idempotency-Key values starting with 'hold:' are reserved for captured holds"


class IdempotencyConflict(AppError):
    status_code = 409
    default_detail = "this Idempotency-Key was already used with a different request"


@dataclass(frozen=True, slots=True)
class LedgerMismatch:
    profile_id: UUID
    balance: int
    ledger_sum: int
    held: int
    holds_sum: int


# A capture's spend entry names its hold (hold:<id>): reserved, so no client Idempotency-Key can take it.
HOLD_REFERENCE_PREFIX = "hold:"
_ENTRY_COLUMNS = ", ".join(CreditEntryOut.model_fields)
# Add $2 (negative to take) to the balance and record it, in one statement; the UPDATE's row lock serialises
# moves on one balance. With $6 (checked), nothing happens when the balance would drop below what is held.
_MOVE_SQL = f"""
WITH moved AS (
    UPDATE profiles SET credits = credits + $2::bigint
    WHERE id = $1 AND (NOT $6::boolean OR credits - held + $2::bigint >= 0)
    RETURNING id, credits
)
INSERT INTO credit_entries (profile_id, amount, balance_after, kind, reference, note)
SELECT id, $2::bigint, credits, $3::text, $4::text, $5::text FROM moved
RETURNING {_ENTRY_COLUMNS}
"""  # noqa: S608 - column names from the schema
# Holds past their expiry stop counting at once; this marks them, and gives back what they held, when a balance
# check would otherwise fail on them.
_EXPIRE_SQL = """
WITH expired AS (
    UPDATE credit_holds SET state = 'expired', resolved_at = now()
    WHERE profile_id = $1 AND state = 'active' AND expires_at <= now()
    RETURNING amount
)
UPDATE profiles SET held = held - (SELECT sum(amount) FROM expired)
WHERE id = $1 AND EXISTS (SELECT FROM expired)
RETURNING held
"""
_BALANCE_SQL = "SELECT credits, held, credits - held AS available FROM profiles WHERE id = $1"
_KEYED_SQL = f"""
SELECT {_ENTRY_COLUMNS} FROM credit_entries WHERE profile_id = $1 AND kind = $2 AND reference = $3
"""  # noqa: S608
_GRANTED_SQL = "SELECT 1 FROM credit_entries WHERE kind = $1 AND reference = $2"
_ENTRIES_SQL = f"""
SELECT {_ENTRY_COLUMNS} FROM credit_entries WHERE profile_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3
"""  # noqa: S608
_NEWEST = 2**63 - 1  # above every entry id: the first page


def _entry(row: object) -> CreditEntryOut:
    return CreditEntryOut.model_validate(dict(row))  # type: ignore[call-overload]


async def expire_due_holds(db: Queries, user_id: UUID) -> bool:
    """Mark the user's holds past their expiry as expired; whether there were any."""
    return await db.fetchval(_EXPIRE_SQL, user_id) is not None


async def balance(db: Queries, user_id: UUID) -> BalanceOut:
    row = await db.fetchrow(_BALANCE_SQL, user_id)
    if row is None:
        raise ProfileNotFound
    return BalanceOut.model_validate(dict(row))


async def move_balance(
    db: Queries, user_id: UUID, amount: int, kind: CreditKind, reference: str | None, note: str | None, *, checked: bool
) -> CreditEntryOut | None:
    """Add `amount` (negative: take) and record it. Checked, None when the balance would drop below what is held
    (holds past their expiry no longer count); unchecked, it may go below zero (a take-back). None without a
    profile."""
    row = await db.fetchrow(_MOVE_SQL, user_id, amount, kind.value, reference, note, checked)
    if row is None and checked and await expire_due_holds(db, user_id):
        row = await db.fetchrow(_MOVE_SQL, user_id, amount, kind.value, reference, note, checked)
    if row is None:
        return None
    count_credits(kind.value, amount)
    return _entry(row)


async def _keyed(
    db: Queries, user_id: UUID, kind: CreditKind, key: str, amount: int, note: str | None
) -> CreditEntryOut | None:
    """The earlier entry made with this Idempotency-Key, if the request is the same; 409 if it is not. The profile
    is locked first, so "already done?" and "do it" cannot interleave for one user."""
    await lock_profile(db, user_id)
    earlier = await db.fetchrow(_KEYED_SQL, user_id, kind.value, key)
    if earlier is None:
        return None
    if earlier["amount"] != amount or earlier["note"] != note:
        raise IdempotencyConflict
    return _entry(earlier)


async def _checked_move(
    db: Queries, user_id: UUID, amount: int, kind: CreditKind, key: str | None, note: str | None
) -> CreditEntryOut:
    """A spend or an adjustment: keyed (a retry answers the first entry), never below what is held."""
    if key is not None and (earlier := await _keyed(db, user_id, kind, key, amount, note)) is not None:
        return earlier
    entry = await move_balance(db, user_id, amount, kind, key, note, checked=amount < 0)
    if entry is not None:
        return entry
    raise InsufficientCredits(await balance(db, user_id), -amount)


async def spend(
    db: Queries, user_id: UUID, amount: int, reason: str | None, idempotency_key: str | None
) -> CreditEntryOut:
    """Take `amount` credits from what is available. A retry with the same idempotency key and request returns the
    first entry and charges nothing; the same key with a different request is a conflict."""
    if idempotency_key is not None and idempotency_key.startswith(HOLD_REFERENCE_PREFIX):
        raise ReservedKey
    return await _checked_move(db, user_id, -amount, CreditKind.SPEND, idempotency_key, reason)


async def adjust(
    db: Queries, user_id: UUID, amount: int, reason: str, idempotency_key: str | None = None
) -> CreditEntryOut:
    """A service-role correction, signed, idempotent by key as spends are; it never takes the balance below what
    is held (a positive one may bring a balance that owes back up)."""
    return await _checked_move(db, user_id, amount, CreditKind.ADJUSTMENT, idempotency_key, reason)


async def grant(
    db: Queries, user_id: UUID, amount: int, kind: CreditKind, reference: str, note: str | None = None
) -> CreditEntryOut | None:
    """Credits paid for through Stripe, at most once per (kind, Stripe object id); None when that object was
    already granted. The profile must exist. A balance that owes is repaid first, simply by the addition."""
    await lock_profile(db, user_id)
    if await db.fetchval(_GRANTED_SQL, kind.value, reference) is not None:
        return None
    entry = await move_balance(db, user_id, amount, kind, reference, note, checked=False)
    if entry is None:
        raise ProfileNotFound
    return entry


async def list_entries(db: Queries, user_id: UUID, limit: int, before: int | None) -> list[CreditEntryOut]:
    """The user's entries, newest first, starting below the `before` cursor (an entry id)."""
    rows = await db.fetch(_ENTRIES_SQL, user_id, before or _NEWEST, limit)
    return [_entry(row) for row in rows]


async def find_ledger_mismatches(session: AsyncSession) -> list[LedgerMismatch]:
    """Every profile whose balance differs from the sum of its ledger entries, or whose held total differs from
    the sum of its active holds (none, when all is well)."""
    entries = (
        select(CreditEntry.profile_id, func.sum(CreditEntry.amount).label("total"))
        .group_by(CreditEntry.profile_id)
        .subquery()
    )
    holds = (
        select(CreditHold.profile_id, func.sum(CreditHold.amount).label("total"))
        .where(CreditHold.state == text("'active'"))
        .group_by(CreditHold.profile_id)
        .subquery()
    )
    ledger_sum, holds_sum = func.coalesce(entries.c.total, 0), func.coalesce(holds.c.total, 0)
    rows = await session.execute(
        select(Profile.id, Profile.credits, ledger_sum, Profile.held, holds_sum)
        .outerjoin(entries, entries.c.profile_id == Profile.id)
        .outerjoin(holds, holds.c.profile_id == Profile.id)
        .where((Profile.credits != ledger_sum) | (Profile.held != holds_sum))
        .order_by(Profile.id)
    )
    return [LedgerMismatch(row[0], row[1], int(row[2]), row[3], int(row[4])) for row in rows]
