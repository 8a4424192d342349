"""Spending credits, holds for running jobs, and the ledger history."""

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, status

from app.deps import CurrentUser, Db, DbRoute, IdempotencyKey, UserOrServiceRole
from app.routes.responses import errors
from app.schemas import (
    BalanceChangeOut,
    CaptureRequest,
    HoldAnswer,
    HoldRequest,
    HoldsOut,
    PageQuery,
    SpendRequest,
    TransactionsOut,
)
from app.services import credits, holds

router = APIRouter(tags=["credits"], route_class=DbRoute)


@router.post(
    "/credits/spend",
    summary="Spend credits",
    description=(
        "Atomic: never more than is available (credits not held). 402 (with `balance`, `held`, `available` and "
        "`requested`) when too little is available."
    ),
    responses=errors(400, 401, 402, 403, 404, 408, 409, 413, 422, 429, 503),
)
async def spend(
    user: CurrentUser, db: Db, body: SpendRequest, idempotency_key: IdempotencyKey = None
) -> BalanceChangeOut:
    return BalanceChangeOut.of(await credits.spend(db, user.id, body.amount, body.reason, idempotency_key))


@router.get("/credits/transactions", summary="Your ledger, newest first", responses=errors(401, 403, 422, 503))
async def transactions(user: CurrentUser, db: Db, page_query: Annotated[PageQuery, Query()]) -> TransactionsOut:
    limit = page_query.limit
    entries = await credits.list_entries(db, user.id, limit + 1, page_query.before)
    page = entries[:limit]
    next_cursor = page[-1].id if len(entries) > limit else None
    return TransactionsOut(entries=page, next_cursor=next_cursor)


@router.post(
    "/credits/holds",
    summary="Reserve credits for a job",
    description=(
        "Holds `amount` of your available credits until it is captured, released, or expires after `ttl_seconds`. "
        "402 when too little is available."
    ),
    status_code=status.HTTP_201_CREATED,
    responses=errors(400, 401, 402, 403, 404, 408, 409, 413, 422, 429, 503),
)
async def create_hold(
    user: CurrentUser, db: Db, body: HoldRequest, idempotency_key: IdempotencyKey = None
) -> HoldAnswer:
    result = await holds.create(db, user.id, body.amount, body.reason, body.ttl_seconds, idempotency_key)
    return HoldAnswer(hold=result.hold, balance=result.balance, entry=result.entry)


@router.get("/credits/holds", summary="Your active holds", responses=errors(401, 403, 503))
async def list_holds(user: CurrentUser, db: Db) -> HoldsOut:
    return HoldsOut(holds=await holds.active(db, user.id))


@router.post(
    "/credits/holds/{hold_id}/capture",
    summary="Spend (part of) a hold; the rest goes back",
    description=(
        "One spend entry for `amount` (all of the hold when left out). A user settles their own holds; a worker "
        "holding the service-role key settles anyone's. 404 for a hold that is not yours, 409 once it was "
        "captured, released or expired (a retry with the same Idempotency-Key answers the first outcome)."
    ),
    responses=errors(400, 401, 403, 404, 408, 409, 413, 422, 429, 503),
)
async def capture_hold(
    caller: UserOrServiceRole,
    db: Db,
    hold_id: UUID,
    body: CaptureRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> HoldAnswer:
    amount = body.amount if body else None
    result = await holds.capture(db, caller, hold_id, amount, idempotency_key)
    return HoldAnswer(hold=result.hold, balance=result.balance, entry=result.entry)


@router.post(
    "/credits/holds/{hold_id}/release",
    summary="Give a hold back",
    description="As capture, for a job that failed: nothing is spent.",
    responses=errors(401, 403, 404, 409, 429, 503),
)
async def release_hold(
    caller: UserOrServiceRole, db: Db, hold_id: UUID, idempotency_key: IdempotencyKey = None
) -> HoldAnswer:
    result = await holds.release(db, caller, hold_id, idempotency_key)
    return HoldAnswer(hold=result.hold, balance=result.balance, entry=result.entry)
