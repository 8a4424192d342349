"""Billing: the catalogue, Stripe Checkout, the customer portal, and Stripe's webhook."""

from typing import Annotated

import stripe
from fastapi import APIRouter, Depends, Header, Request

from app.auth import CurrentUser
from app.config import CatalogueItem, Settings
from app.database import SessionDep, SessionFactoryDep
from app.errors import ServiceUnavailable
from app.routes.responses import errors
from app.schemas import (
    CatalogueEntryOut,
    CheckoutOut,
    CheckoutRequest,
    ErrorResponse,
    PlansOut,
    PortalOut,
    WebhookOut,
)
from app.services import billing

router = APIRouter(tags=["billing"])
webhook_router = APIRouter(tags=["webhook"])


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _stripe(request: Request) -> stripe.StripeClient:
    connection: billing.StripeConnection | None = request.app.state.stripe
    if connection is None:
        raise ServiceUnavailable(billing.STRIPE_NOT_CONFIGURED, retry_after=3600)
    return connection.client


SettingsDep = Annotated[Settings, Depends(_settings)]
StripeDep = Annotated[stripe.StripeClient, Depends(_stripe)]


def _entries(catalogue: dict[str, CatalogueItem]) -> list[CatalogueEntryOut]:
    return [
        CatalogueEntryOut(price_id=price, name=item.name, credits=item.credits) for price, item in catalogue.items()
    ]


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
    responses=errors(400, 401, 403, 409, 413, 422, 502, 503),
)
async def checkout(
    user: CurrentUser, sessions: SessionFactoryDep, settings: SettingsDep, client: StripeDep, body: CheckoutRequest
) -> CheckoutOut:
    url, session_id = await billing.create_checkout(sessions, client, settings, user, body.price_id)
    return CheckoutOut(url=url, session_id=session_id)


@router.post(
    "/billing/portal",
    summary="Open Stripe's customer portal",
    description="Manage the subscription, payment methods and invoices. 404 until you have bought something.",
    responses=errors(401, 403, 404, 502, 503),
)
async def portal(user: CurrentUser, sessions: SessionFactoryDep, settings: SettingsDep, client: StripeDep) -> PortalOut:
    return PortalOut(url=await billing.create_portal(sessions, client, settings, user.id))


@webhook_router.post(
    "/webhook",
    summary="Stripe events (called by Stripe)",
    description=(
        "Verifies `Stripe-Signature` on the raw body, then applies the event once: a repeated delivery answers 200 "
        "and changes nothing. Handled: " + ", ".join(f"`{name}`" for name in billing.HANDLED_EVENTS) + "; other "
        "types are acknowledged and ignored. A 5xx makes Stripe retry."
    ),
    responses={
        400: {"model": ErrorResponse, "description": "Missing or invalid signature, or a stale timestamp"},
        **errors(413, 503),
    },
)
async def webhook(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    stripe_signature: Annotated[str | None, Header(alias="Stripe-Signature")] = None,
) -> WebhookOut:
    if settings.stripe_webhook_secret is None:
        raise ServiceUnavailable(billing.WEBHOOK_NOT_CONFIGURED, retry_after=3600)
    payload = await request.body()
    event = billing.verify_event(payload, stripe_signature, settings.stripe_webhook_secret.get_secret_value())
    result = await billing.process_event(session, settings, event)
    return WebhookOut(duplicate=result.duplicate, outcome=result.outcome)
