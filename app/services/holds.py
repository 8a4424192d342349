"""Credit holds: credits reserved while a job runs, then captured (one spend entry), released, or left to expire.

A hold is not a ledger entry: it moves `profiles.held`, and only a capture writes to the ledger. Creating one
checks `credits - held` in the statement that reserves, so concurrent holds and spends never reserve more than
is there. Expiry needs no worker: a hold past `expires_at` stops counting at once and is marked when next
touched.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from app.auth import Principal, User
from app.database import Queries
from app.errors import AppError
from app.metrics import count_credits, count_held
from app.models import HoldState
from app.schemas import BalanceOut, CreditEntryOut, HoldOut
from app.services.credits import (
    HOLD_REFERENCE_PREFIX,
    IdempotencyConflict,
    InsufficientCredits,
    balance,
    expire_due_holds,
)
from app.services.profiles import lock_profile


class HoldNotFound(AppError):
    # Also for another user's hold: ids are not probed.
    status_code = 404
    default_detail = "hold not found"


class HoldResolved(AppError):
    status_code = 409

    def __init__(self, state: str) -> None:
        super().__init__(f"hold {state}" if state == HoldState.EXPIRED else f"hold already {state}")


class CaptureTooLarge(AppError):
    status_code = 422

    def __init__(self, held: int, requested: int) -> None:
        super().__init__(f"cannot capture {requested}: the hold is for {held}")


@dataclass(frozen=True, slots=True)
class HoldResult:
    hold: HoldOut
    balance: BalanceOut
    entry: CreditEntryOut | None = None


_HOLD_COLUMNS = ", ".join(HoldOut.model_fields)
_ENTRY_COLUMNS = ", ".join(CreditEntryOut.model_fields)
_RESERVE_SQL = f"""
WITH reserved AS (
    UPDATE profiles SET held = held + $3 WHERE id = $2 AND credits - held >= $3 RETURNING id, credits, held
)
INSERT INTO credit_holds (id, profile_id, amount, reason, ttl_seconds, idempotency_key, expires_at)
SELECT $1, id, $3, $4, $5::integer, $6, now() + $5::integer * interval '1 second' FROM reserved
RETURNING {_HOLD_COLUMNS}, (SELECT credits FROM reserved), (SELECT held FROM reserved)
"""  # noqa: S608 - column names from the schema
_BY_KEY_SQL = f"""
SELECT {_HOLD_COLUMNS}, ttl_seconds FROM credit_holds WHERE profile_id = $1 AND idempotency_key = $2
"""  # noqa: S608
_LOCK_SQL = f"""
SELECT {_HOLD_COLUMNS}, profile_id, resolved_key, expires_at <= now() AS due FROM credit_holds WHERE id = $1 FOR UPDATE
"""  # noqa: S608
_ACTIVE_SQL = f"""
SELECT {_HOLD_COLUMNS} FROM credit_holds WHERE profile_id = $1 AND state = 'active' AND expires_at > now()
ORDER BY created_at
"""  # noqa: S608
_ENTRY_AS = ", ".join(f"{name} AS entry_{name}" for name in CreditEntryOut.model_fields)
# Resolve a hold and give back what it held, with (for a capture of $3 > 0) the spend entry, in one statement.
_RESOLVE_SQL = f"""
WITH resolved AS (
    UPDATE credit_holds SET state = $2, captured = $3, resolved_at = now(), resolved_key = $4
    WHERE id = $1 RETURNING {_HOLD_COLUMNS}, profile_id
), moved AS (
    UPDATE profiles p SET credits = p.credits - r.captured, held = p.held - r.amount
    FROM resolved r WHERE p.id = r.profile_id
    RETURNING p.id, p.credits, p.held
), spent AS (
    INSERT INTO credit_entries (profile_id, amount, balance_after, kind, reference, note)
    SELECT m.id, -r.captured, m.credits, 'spend', $5, r.reason FROM moved m, resolved r WHERE r.captured > 0
    RETURNING {_ENTRY_AS}
)
SELECT r.*, m.credits, m.held, s.* FROM resolved r JOIN moved m ON true LEFT JOIN spent s ON true
"""  # noqa: S608
_CAPTURE_ENTRY_SQL = f"""
SELECT {_ENTRY_AS} FROM credit_entries WHERE profile_id = $1 AND kind = 'spend' AND reference = $2
"""  # noqa: S608


def _hold(row: Mapping[str, Any]) -> HoldOut:
    return HoldOut.model_validate({name: row[name] for name in HoldOut.model_fields})


def _balance(row: Mapping[str, Any]) -> BalanceOut:
    return BalanceOut(credits=row["credits"], held=row["held"], available=row["credits"] - row["held"])


def _entry(row: Mapping[str, Any] | None) -> CreditEntryOut | None:
    if row is None or row["entry_id"] is None:
        return None
    return CreditEntryOut.model_validate({name: row[f"entry_{name}"] for name in CreditEntryOut.model_fields})


async def create(
    db: Queries, user_id: UUID, amount: int, reason: str | None, ttl_seconds: int, idempotency_key: str | None
) -> HoldResult:
    """Reserve `amount` of what is available for `ttl_seconds`. With an Idempotency-Key, a retry of the same request
    answers the first hold; the same key with another request is a conflict."""
    if idempotency_key is not None:
        await lock_profile(db, user_id)
        earlier = await db.fetchrow(_BY_KEY_SQL, user_id, idempotency_key)
        if earlier is not None:
            if (earlier["amount"], earlier["reason"], earlier["ttl_seconds"]) != (amount, reason, ttl_seconds):
                raise IdempotencyConflict
            return HoldResult(_hold(earlier), await balance(db, user_id))
    arguments = (uuid.uuid4(), user_id, amount, reason, ttl_seconds, idempotency_key)
    row = await db.fetchrow(_RESERVE_SQL, *arguments)
    if row is None and await expire_due_holds(db, user_id):
        row = await db.fetchrow(_RESERVE_SQL, *arguments)
    if row is None:
        raise InsufficientCredits(await balance(db, user_id), amount)  # or 404 without a profile
    count_held(amount)
    return HoldResult(_hold(row), _balance(row))


async def active(db: Queries, user_id: UUID) -> list[HoldOut]:
    return [_hold(row) for row in await db.fetch(_ACTIVE_SQL, user_id)]


async def capture(
    db: Queries, caller: Principal, hold_id: UUID, amount: int | None, idempotency_key: str | None
) -> HoldResult:
    """Turn (part of) a hold into one spend entry and give back the rest. It succeeds even when a take-back has
    since left the balance below the hold: the credits were reserved."""
    return await _resolve(db, caller, hold_id, HoldState.CAPTURED, amount, idempotency_key)


async def release(db: Queries, caller: Principal, hold_id: UUID, idempotency_key: str | None) -> HoldResult:
    return await _resolve(db, caller, hold_id, HoldState.RELEASED, None, idempotency_key)


async def _resolve(
    db: Queries, caller: Principal, hold_id: UUID, state: HoldState, amount: int | None, key: str | None
) -> HoldResult:
    """Resolve a hold once. Its row lock makes a capture and a release racing each other take turns: the second
    finds it resolved, and answers the first outcome only if it is the same request retried (same key)."""
    row = await db.fetchrow(_LOCK_SQL, hold_id)
    if row is None or (isinstance(caller, User) and row["profile_id"] != caller.id):
        raise HoldNotFound
    hold, owner = _hold(row), row["profile_id"]
    captured = (hold.amount if amount is None else amount) if state is HoldState.CAPTURED else 0
    if hold.state != HoldState.ACTIVE:
        if key is not None and row["resolved_key"] == key and hold.state == state and hold.captured == captured:
            entry = await db.fetchrow(_CAPTURE_ENTRY_SQL, owner, HOLD_REFERENCE_PREFIX + str(hold_id))
            return HoldResult(hold, await balance(db, owner), _entry(entry))
        raise HoldResolved(hold.state)
    if row["due"]:
        raise HoldResolved(HoldState.EXPIRED)  # rolled back with this answer; marked by the next spend or hold
    if captured > hold.amount:
        raise CaptureTooLarge(hold.amount, captured)
    reference = HOLD_REFERENCE_PREFIX + str(hold_id)
    resolved = await db.fetchrow(_RESOLVE_SQL, hold_id, state.value, captured, key, reference)
    assert resolved is not None  # the row is locked by this transaction
    count_credits("hold_capture", -captured)
    return HoldResult(_hold(resolved), _balance(resolved), _entry(resolved))
