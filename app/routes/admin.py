"""What only the service role may do: adjustments and support."""

from uuid import UUID

from fastapi import APIRouter

from app.deps import Db, DbRoute, IdempotencyKey, ServiceRole
from app.routes.responses import errors
from app.schemas import AdjustmentRequest, BalanceChangeOut
from app.services import credits

router = APIRouter(tags=["admin"], route_class=DbRoute)


@router.post(
    "/admin/profiles/{user_id}/credits",
    summary="Adjust a user's credits (service role)",
    description=(
        "Adds (or, negative, takes) credits with a reason recorded in the ledger; never below what is held (402). "
        "With `Idempotency-Key`, a retry of the same request answers the first entry (another request: 409)."
    ),
    responses=errors(400, 401, 402, 403, 404, 409, 413, 422, 503),
)
async def adjust(
    _: ServiceRole, db: Db, user_id: UUID, body: AdjustmentRequest, idempotency_key: IdempotencyKey = None
) -> BalanceChangeOut:
    return BalanceChangeOut.of(await credits.adjust(db, user_id, body.amount, body.reason, idempotency_key))
