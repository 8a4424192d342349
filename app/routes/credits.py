"""Spending credits, the ledger history, and service-role adjustments."""

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Header, Query

from app.deps import CurrentUser, Db, DbRoute, ServiceRole
from app.routes.responses import errors
from app.schemas import AdjustmentRequest, BalanceChangeOut, CreditEntryOut, PageQuery, SpendRequest, TransactionsOut
from app.services import credits

router = APIRouter(tags=["credits"], route_class=DbRoute)
admin_router = APIRouter(tags=["admin"], route_class=DbRoute)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Any unique string (a UUID): a retry with the same key and body is answered, not charged again",
    ),
]


def _change(entry: CreditEntryOut) -> BalanceChangeOut:
    return BalanceChangeOut(balance=entry.balance_after, entry=entry)


@router.post(
    "/credits/spend",
    summary="Spend credits",
    description="Atomic: the balance never goes below zero. 402 (with `balance` and `requested`) when too low.",
    responses=errors(400, 401, 402, 403, 404, 409, 413, 422, 503),
)
async def spend(
    user: CurrentUser, db: Db, body: SpendRequest, idempotency_key: IdempotencyKey = None
) -> BalanceChangeOut:
    return _change(await credits.spend(db, user.id, body.amount, body.reason, idempotency_key))


@router.get("/credits/transactions", summary="Your ledger, newest first", responses=errors(401, 403, 422, 503))
async def transactions(user: CurrentUser, db: Db, page_query: Annotated[PageQuery, Query()]) -> TransactionsOut:
    limit = page_query.limit
    entries = await credits.list_entries(db, user.id, limit + 1, page_query.before)
    page = entries[:limit]
    next_cursor = page[-1].id if len(entries) > limit else None
    return TransactionsOut(entries=page, next_cursor=next_cursor)


@admin_router.post(
    "/admin/profiles/{user_id}/credits",
    summary="Adjust a user's credits (service role)",
    description="Adds (or, negative, takes) credits with a reason recorded in the ledger; never below zero (402).",
    responses=errors(400, 401, 402, 403, 404, 413, 422, 503),
)
async def adjust(_: ServiceRole, db: Db, user_id: UUID, body: AdjustmentRequest) -> BalanceChangeOut:
    return _change(await credits.adjust(db, user_id, body.amount, body.reason))
