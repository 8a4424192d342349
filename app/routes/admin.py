"""What only the service role may do: adjustments and support."""

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query

from app.deps import Db, DbRoute, IdempotencyKey, ServiceRole, SessionDep, SettingsDep, StripeDep
from app.routes.responses import errors
from app.schemas import (
    AdjustmentRequest,
    BalanceChangeOut,
    ReplayOut,
    SupportProfileOut,
    SupportQuery,
    SupportSearchOut,
)
from app.services import credits, support
from app.services.billing.events import WebhookContext
from app.services.billing.webhook import replay_event

router = APIRouter(tags=["admin"], route_class=DbRoute)


@router.get(
    "/admin/profiles",
    summary="Find users by email or Stripe customer id (service role)",
    description=(
        "`?email=` (any case) or `?stripe_customer_id=`: each user found, as `GET /admin/profiles/{user_id}` shows "
        "them (none: an empty list)."
    ),
    responses=errors(401, 403, 422, 503),
)
async def find_profiles(_: ServiceRole, db: Db, query: Annotated[SupportQuery, Query()]) -> SupportSearchOut:
    found = await support.find_users(db, email=query.email, stripe_customer_id=query.stripe_customer_id)
    return SupportSearchOut(profiles=[await support.support_view(db, user_id) for user_id in found])


@router.get(
    "/admin/profiles/{user_id}",
    summary="One user as support sees them (service role)",
    description=(
        "The profile and its balance figures, the newest ledger entries, active holds, the Stripe events that "
        "concerned the user with what each did, their checkouts and the payments behind their grants."
    ),
    responses=errors(401, 403, 404, 422, 503),
)
async def profile_for_support(_: ServiceRole, db: Db, user_id: UUID) -> SupportProfileOut:
    return await support.support_view(db, user_id)


@router.post(
    "/admin/profiles/{user_id}/credits",
    summary="Adjust a user's credits (service role)",
    description=(
        "Adds (or, negative, takes) credits with a reason recorded in the ledger; never below what is held (402). "
        "With `Idempotency-Key`, a retry of the same request answers the first entry (another request: 409)."
    ),
    responses=errors(400, 401, 402, 403, 404, 408, 409, 413, 422, 503),
)
async def adjust(
    _: ServiceRole, db: Db, user_id: UUID, body: AdjustmentRequest, idempotency_key: IdempotencyKey = None
) -> BalanceChangeOut:
    return BalanceChangeOut.of(await credits.adjust(db, user_id, body.amount, body.reason, idempotency_key))


@router.post(
    "/admin/stripe/events/{event_id}/replay",
    summary="Fetch one Stripe event and process it now (service role)",
    description=(
        'For support ("my credits never arrived"): the event is fetched from Stripe\'s API and processed as if '
        "delivered now. An event already processed changes nothing (`duplicate`); 404 when Stripe does not have it."
    ),
    responses=errors(401, 403, 404, 502, 503),
)
async def replay(
    _: ServiceRole, event_id: str, session: SessionDep, settings: SettingsDep, client: StripeDep
) -> ReplayOut:
    result = await replay_event(WebhookContext(session, settings.catalogue, client), event_id)
    return ReplayOut(event_id=event_id, type=result.type, duplicate=result.duplicate, outcome=result.outcome)
