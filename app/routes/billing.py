"""Billing: the catalogue, Stripe Checkout, the customer portal, and Stripe's webhook."""

from fastapi import APIRouter

from app.config import CatalogueItem
from app.deps import CurrentUser, OptionalStripe, SessionDep, SessionFactoryDep, SettingsDep, StripeDep, VerifiedEvent
from app.routes.responses import errors
from app.schemas import CatalogueEntryOut, CheckoutOut, CheckoutRequest, ErrorResponse, PlansOut, PortalOut, WebhookOut
from app.services.billing import checkout as billing
from app.services.billing.events import WebhookContext
from app.services.billing.handlers import HANDLED_EVENTS
from app.services.billing.webhook import receive

router = APIRouter(tags=["billing"])
webhook_router = APIRouter(tags=["webhook"])


def _entries(items: dict[str, CatalogueItem]) -> list[CatalogueEntryOut]:
    return [CatalogueEntryOut(price_id=price, name=item.name, credits=item.credits) for price, item in items.items()]


@router.get("/billing/plans", summary="Credit packs and subscription plans for sale")
async def plans(settings: SettingsDep) -> PlansOut:
    return PlansOut(
        publishable_key=settings.stripe_publishable_key,
        checkout_enabled=settings.stripe_secret_key is not None,
        credit_packs=_entries(settings.credit_packs),
        subscription_plans=_entries(settings.subscription_plans),
    )


@router.post(
    "/billing/checkout",
    summary="Start a Stripe Checkout for a pack or a plan",
    description=(
        "Returns the Checkout URL to send the browser to. Credits arrive through the webhook once Stripe confirms "
        "the payment. 422 for a price that is not in GET /billing/plans, 502 when Stripe fails, 503 when payments "
        "are not configured."
    ),
    responses=errors(400, 401, 403, 408, 409, 413, 422, 502, 503),
)
async def checkout(
    user: CurrentUser, sessions: SessionFactoryDep, settings: SettingsDep, client: StripeDep, body: CheckoutRequest
) -> CheckoutOut:
    url, session_id = await billing.create_checkout(
        sessions,
        client,
        settings.catalogue,
        settings.billing_return_base,
        user,
        settings.signup_grants,
        body.price_id,
    )
    return CheckoutOut(url=url, session_id=session_id)


@router.post(
    "/billing/portal",
    summary="Open Stripe's customer portal",
    description="Manage the subscription, payment methods and invoices. 404 until you have bought something.",
    responses=errors(401, 403, 404, 502, 503),
)
async def portal(user: CurrentUser, sessions: SessionFactoryDep, settings: SettingsDep, client: StripeDep) -> PortalOut:
    return PortalOut(url=await billing.create_portal(sessions, client, settings.billing_return_base, user.id))


@webhook_router.post(
    "/webhook",
    summary="Stripe events (called by Stripe)",
    description=(
        "Verifies `Stripe-Signature` on the raw body, then applies the event once: a repeated delivery answers 200 "
        "and changes nothing. Handled: " + ", ".join(f"`{name}`" for name in HANDLED_EVENTS) + "; other "
        "types are acknowledged and ignored. A 5xx makes Stripe retry."
    ),
    responses={
        400: {"model": ErrorResponse, "description": "Missing or invalid signature, or a stale timestamp"},
        **errors(408, 413, 503),
    },
)
async def webhook(
    event: VerifiedEvent, session: SessionDep, settings: SettingsDep, client: OptionalStripe
) -> WebhookOut:
    context = WebhookContext(session, settings.catalogue, client)
    result = await receive(context, event)
    return WebhookOut(duplicate=result.duplicate, outcome=result.outcome)
