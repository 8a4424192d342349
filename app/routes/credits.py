"""Spending credits, the ledger history, and service-role adjustments."""

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Header, Query, Request

from app.auth import CurrentUser, ServiceRole
from app.database import SessionDep, pooled_connection
from app.routes.responses import errors
from app.schemas import AdjustmentRequest, BalanceChangeOut, CreditEntryOut, PageQuery, SpendRequest, TransactionsOut
from app.services import credits

router = APIRouter(tags=["credits"])
admin_router = APIRouter(tags=["admin"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Any unique string (a UUID): a retry with the same key and body is answered, not charged again",
    ),
]


def _change(entry: credits.Entry) -> BalanceChangeOut:
    return BalanceChangeOut(balance=entry.balance_after, entry=CreditEntryOut.model_validate(entry))


@router.post(
    "/credits/spend",
    summary="Spend credits",
    description="Atomic: the balance never goes below zero. 402 (with `balance` and `requested`) when too low.",
    responses=errors(400, 401, 402, 403, 404, 409, 413, 422, 503),
)
async def spend(
    user: CurrentUser, request: Request, body: SpendRequest, idempotency_key: IdempotencyKey = None
) -> BalanceChangeOut:
    async with pooled_connection(request) as connection:
        entry = await credits.spend(connection, user.id, body.amount, body.reason, idempotency_key)
    return _change(entry)


@router.get("/credits/transactions", summary="Your ledger, newest first", responses=errors(401, 403, 422, 503))
async def transactions(
    user: CurrentUser,
    request: Request,
    page_query: Annotated[PageQuery, Query()],
) -> TransactionsOut:
    limit = page_query.limit
    async with pooled_connection(request) as connection:
        entries = await credits.list_entries(connection, user.id, limit + 1, page_query.before)
    page = entries[:limit]
    next_cursor = page[-1].id if len(entries) > limit else None
    return TransactionsOut(entries=[CreditEntryOut.model_validate(e) for e in page], next_cursor=next_cursor)


@admin_router.post(
    "/admin/profiles/{user_id}/credits",
    summary="Adjust a user's credits (service role)",
    description="Adds (or, negative, takes) credits with a reason recorded in the ledger; never below zero (402).",
    responses=errors(400, 401, 402, 403, 404, 413, 422, 503),
)
async def adjust(_: ServiceRole, session: SessionDep, user_id: UUID, body: AdjustmentRequest) -> BalanceChangeOut:
    entry = await credits.adjust(session, user_id, body.amount, body.reason)
    return _change(entry)
