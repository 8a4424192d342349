"""The credits ledger: every change of a balance is one statement that moves `profiles.credits` and writes
its `credit_entries` row together, so a balance never goes negative, never loses a concurrent update and
always equals the sum of its entries."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from sqlalchemy import Integer, Text, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict, NotFound, PaymentRequired
from app.models import CreditEntry, CreditKind, Profile
from app.services.profiles import PROFILE_NOT_FOUND


@dataclass(frozen=True, slots=True)
class LedgerMismatch:
    profile_id: UUID
    balance: int
    ledger_sum: int


async def _move(
    session: AsyncSession, user_id: UUID, amount: int, kind: CreditKind, reference: str | None, note: str | None
) -> CreditEntry | None:
    """Add `amount` (negative to take) to the balance and record it, in one statement.

    None when the profile does not exist or the balance would go below zero; nothing is written then.
    The row lock taken by the UPDATE serialises concurrent moves on one balance.
    """
    moved = (
        update(Profile)
        .where(Profile.id == user_id, Profile.credits + amount >= 0)
        .values(credits=Profile.credits + amount)
        .returning(Profile.id, Profile.credits)
        .cte("moved")
    )
    entry = (
        insert(CreditEntry)
        .from_select(
            ["profile_id", "amount", "balance_after", "kind", "reference", "note"],
            select(
                moved.c.id,
                literal(amount, Integer),
                moved.c.credits,
                literal(kind.value, Text),
                literal(reference, Text),
                literal(note, Text),
            ),
        )
        .returning(CreditEntry)
    )
    result: CreditEntry | None = await session.scalar(entry)
    return result


async def _balance(session: AsyncSession, user_id: UUID) -> int:
    balance = await session.scalar(select(Profile.credits).where(Profile.id == user_id))
    if balance is None:
        raise NotFound(PROFILE_NOT_FOUND)
    return balance


async def _lock_profile(session: AsyncSession, user_id: UUID) -> None:
    """Serialise changes to one balance, so an "already done?" check and the change cannot interleave
    with a concurrent request doing the same."""
    found = await session.scalar(select(Profile.id).where(Profile.id == user_id).with_for_update())
    if found is None:
        raise NotFound(PROFILE_NOT_FOUND)


def _not_enough(balance: int, requested: int) -> PaymentRequired:
    return PaymentRequired(
        f"not enough credits: {balance} available, {requested} requested",
        extra={"balance": balance, "requested": requested},
    )


async def spend(
    session: AsyncSession, user_id: UUID, amount: int, reason: str | None, idempotency_key: str | None
) -> CreditEntry:
    """Take `amount` credits. With an idempotency key, a retry of the same request returns the first
    entry and charges nothing; the same key with a different request is a conflict."""
    if idempotency_key is not None:
        await _lock_profile(session, user_id)
        earlier = await session.scalar(
            select(CreditEntry).where(
                CreditEntry.profile_id == user_id,
                CreditEntry.kind == CreditKind.SPEND.value,
                CreditEntry.reference == idempotency_key,
            )
        )
        if earlier is not None:
            if earlier.amount != -amount or earlier.note != reason:
                raise Conflict("this Idempotency-Key was already used with a different request")
            return earlier
    entry = await _move(session, user_id, -amount, CreditKind.SPEND, idempotency_key, reason)
    if entry is None:
        raise _not_enough(await _balance(session, user_id), amount)
    return entry


async def adjust(session: AsyncSession, user_id: UUID, amount: int, reason: str) -> CreditEntry:
    """A service-role correction, signed, never taking the balance below zero."""
    entry = await _move(session, user_id, amount, CreditKind.ADJUSTMENT, None, reason)
    if entry is None:
        raise _not_enough(await _balance(session, user_id), -amount)
    return entry


async def grant(
    session: AsyncSession, user_id: UUID, amount: int, kind: CreditKind, reference: str, note: str | None = None
) -> CreditEntry | None:
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


async def list_entries(session: AsyncSession, user_id: UUID, limit: int, before: int | None) -> list[CreditEntry]:
    """The user's entries, newest first, starting below the `before` cursor (an entry id)."""
    query = select(CreditEntry).where(CreditEntry.profile_id == user_id)
    if before is not None:
        query = query.where(CreditEntry.id < before)
    rows = await session.scalars(query.order_by(CreditEntry.id.desc()).limit(limit))
    return list(rows)


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
