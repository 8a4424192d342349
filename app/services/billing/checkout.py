"""Stripe Checkout for a pack or a plan, and the customer portal.

Unlike other requests these commit in short steps and hold no database connection while Stripe answers: a slow
Stripe must not drain the pool for everyone else. The profile (made here if it is missing) and the Stripe
customer are kept even when the checkout itself then fails; a retry reuses them.
"""

from __future__ import annotations

import uuid
from uuid import UUID

import stripe
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth import User
from app.config import Catalogue, SignupGrants
from app.errors import AppError
from app.models import CheckoutSession, Profile
from app.services import profiles
from app.services.billing.rules import ENDED_STATUSES, find_offer
from app.services.billing.stripe_api import StripeFailed, counted

# Where Stripe sends the user back to, on FRONTEND_URL. Checkout fills in {CHECKOUT_SESSION_ID} itself.
SUCCESS_PATH = "/billing/success?session_id={CHECKOUT_SESSION_ID}"
CANCEL_PATH = "/billing/cancel"
PORTAL_RETURN_PATH = "/billing"
# What each call to Stripe does: in its error messages, and its name in the metrics.
CREATE_CUSTOMER = "create the Stripe customer"
CREATE_CHECKOUT = "create the checkout session"
OPEN_PORTAL = "open the customer portal"


class SubscriptionExists(AppError):
    status_code = 409

    def __init__(self, status: str) -> None:
        super().__init__(f"you already have a subscription ({status}): change or cancel it with POST /billing/portal")


class NoStripeCustomer(AppError):
    status_code = 404
    default_detail = "no Stripe customer yet: buy a credit pack or subscribe first"


async def _create_customer(sessions: async_sessionmaker[AsyncSession], client: stripe.StripeClient, user: User) -> str:
    """The user's Stripe customer, created at Stripe and stored on the profile (first writer wins)."""
    params: stripe.params.CustomerCreateParams = {"metadata": {"user_id": str(user.id)}}
    if user.email:
        params["email"] = user.email
    try:
        # Keyed by user: a retry (or a concurrent first checkout) gets the same customer, not a second one.
        call = client.v1.customers.create_async(params, {"idempotency_key": f"customer-{user.id}"})
        customer = await counted(CREATE_CUSTOMER, call)
    except stripe.StripeError as exc:
        raise StripeFailed(CREATE_CUSTOMER, exc) from None
    async with sessions.begin() as session:
        stored = await session.scalar(
            update(Profile)
            .where(Profile.id == user.id, Profile.stripe_customer_id.is_(None))
            .values(stripe_customer_id=customer.id)
            .returning(Profile.stripe_customer_id)
        )
        if stored is None:  # a concurrent request stored it first (the same customer, by the idempotency key)
            stored = await session.scalar(select(Profile.stripe_customer_id).where(Profile.id == user.id))
    return stored or customer.id


async def create_checkout(
    sessions: async_sessionmaker[AsyncSession],
    client: stripe.StripeClient,
    catalogue: Catalogue,
    return_base: str,
    user: User,
    grants: SignupGrants,
    price_id: str,
) -> tuple[str, str]:
    """A Checkout Session for a catalogue price: (url, session id). Credits are granted by the webhook."""
    offer = find_offer(catalogue, price_id)
    async with sessions.begin() as session:
        profile, _ = await profiles.get_or_create_profile(session, user, None, grants)
    status = profile.subscription_status
    if offer.mode == "subscription" and status is not None and status not in ENDED_STATUSES:
        raise SubscriptionExists(status)
    customer = profile.stripe_customer_id or await _create_customer(sessions, client, user)
    reference = uuid.uuid4()
    metadata = offer.metadata(str(user.id), str(reference))
    params: stripe.params.checkout.SessionCreateParams = {
        "mode": offer.mode,
        "customer": customer,
        "line_items": [{"price": offer.price_id, "quantity": 1}],
        "client_reference_id": str(user.id),
        "metadata": metadata,
        "success_url": return_base + SUCCESS_PATH,
        "cancel_url": return_base + CANCEL_PATH,
    }
    if offer.mode == "subscription":
        # Copied onto the subscription and every invoice of it, so each renewal finds this checkout.
        params["subscription_data"] = {"metadata": metadata}
    try:
        checkout = await counted(CREATE_CHECKOUT, client.v1.checkout.sessions.create_async(params))
    except stripe.StripeError as exc:
        raise StripeFailed(CREATE_CHECKOUT, exc) from None
    if not checkout.url:
        raise StripeFailed(CREATE_CHECKOUT)
    # Recorded before the URL goes out: the webhook grants only for checkouts this service created, and what
    # they sold, whatever a session's metadata says.
    async with sessions.begin() as session:
        session.add(
            CheckoutSession(
                id=checkout.id,
                profile_id=user.id,
                reference=reference,
                mode=offer.mode,
                price_id=offer.price_id,
                name=offer.item.name,
                credits=offer.item.credits,
            )
        )
    return checkout.url, checkout.id


async def create_portal(
    sessions: async_sessionmaker[AsyncSession], client: stripe.StripeClient, return_base: str, user_id: UUID
) -> str:
    """A customer portal URL (manage the subscription, cards, invoices); 404 without a Stripe customer.
    The database is read first and let go of before Stripe is asked."""
    async with sessions() as session:
        customer = await session.scalar(select(Profile.stripe_customer_id).where(Profile.id == user_id))
    if not customer:
        raise NoStripeCustomer
    params: stripe.params.billing_portal.SessionCreateParams = {
        "customer": customer,
        "return_url": return_base + PORTAL_RETURN_PATH,
    }
    try:
        portal = await counted(OPEN_PORTAL, client.v1.billing_portal.sessions.create_async(params))
    except stripe.StripeError as exc:
        raise StripeFailed(OPEN_PORTAL, exc) from None
    return portal.url
