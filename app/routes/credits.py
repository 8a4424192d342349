"""Spending credits and the ledger history."""

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import CurrentUser, Db, DbRoute, IdempotencyKey
from app.routes.responses import errors
from app.schemas import BalanceChangeOut, PageQuery, SpendRequest, TransactionsOut
from app.services import credits

router = APIRouter(tags=["credits"], route_class=DbRoute)


@router.post(
    "/credits/spend",
    summary="Spend credits",
    description="Atomic: the balance never goes below zero. 402 (with `balance` and `requested`) when too low.",
    responses=errors(400, 401, 402, 403, 404, 409, 413, 422, 503),
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
