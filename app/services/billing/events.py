"""What every webhook handler shares: its context, how it declares what it reads and fetches, and the one step
most of them begin with, finding the user an event is for."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar
from uuid import UUID

from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from stripe import StripeClient

from app.config import Catalogue, CatalogueItem
from app.errors import ServiceUnavailable
from app.models import CheckoutSession, Profile, StripeEvent
from app.services.billing.payloads import Event, Metadata, StripeModel
from app.services.billing.stripe_api import StripeNotConfigured

logger = logging.getLogger(__name__)

# Our checkout puts this in the session's metadata and its subscription's: it names the checkout_sessions row.
CHECKOUT_REFERENCE = "checkout_reference"


class EventIgnored(Exception):
    """Raised by a handler that finds nothing to do; the message says why, and is the event's outcome."""


class NotYet(ServiceUnavailable):
    """The event undoes or follows one not processed yet (Stripe does not promise order): 503, and Stripe's retry
    finds it in place. The end state is the same in every order."""

    retry_after = 60


@dataclass(frozen=True, slots=True)
class WebhookContext:
    """What every handler may use: the request's session, what we sell, Stripe's API (None when STRIPE_SECRET_KEY
    is not set), and the event being processed."""

    session: AsyncSession
    catalogue: Catalogue
    stripe: StripeClient | None
    event_id: str = ""

    @property
    def client(self) -> StripeClient:
        if self.stripe is None:
            raise StripeNotConfigured
        return self.stripe


Payload = TypeVar("Payload", bound=StripeModel)


@dataclass(frozen=True, slots=True)
class Handler(Generic[Payload]):
    """How to act on one event type: the model its object is read into, what to fetch from Stripe's API first
    (before any database work, so no connection waits on Stripe), and what to do with it."""

    payload: type[Payload]
    apply: Callable[[WebhookContext, Event, Payload], Awaitable[str]]
    prepare: Callable[[WebhookContext, Payload], Awaitable[Payload]] | None = None


@dataclass(frozen=True, slots=True)
class RecordedCheckout:
    """A checkout this service created, with what it sold."""

    id: str
    profile_id: UUID
    price_id: str
    name: str
    credits: int
    subscription_id: str | None

    @property
    def item(self) -> CatalogueItem:
        return CatalogueItem(name=self.name, credits=self.credits)


async def recorded_checkout(
    ctx: WebhookContext, *, session_id: str | None = None, metadata: Metadata | None = None
) -> RecordedCheckout | None:
    """The checkout behind an event: by its session id, or by the reference our checkout put in the metadata."""
    query = select(CheckoutSession)
    if session_id is not None:
        query = query.where(CheckoutSession.id == session_id)
    else:
        try:
            reference = uuid.UUID((metadata or {}).get(CHECKOUT_REFERENCE, ""))
        except ValueError:
            return None
        query = query.where(CheckoutSession.reference == reference)
    row = await ctx.session.scalar(query)
    if row is None:
        return None
    return RecordedCheckout(row.id, row.profile_id, row.price_id, row.name, row.credits, row.subscription_id)


async def bind_subscription(ctx: WebhookContext, checkout: RecordedCheckout, subscription_id: str) -> bool:
    """A checkout's plan is granted for the subscription it started, and for no other: the first one seen binds
    it. Whether `subscription_id` is that subscription."""
    if checkout.subscription_id is None:
        bound = await ctx.session.scalar(
            update(CheckoutSession)
            .where(CheckoutSession.id == checkout.id, CheckoutSession.subscription_id.is_(None))
            .values(subscription_id=subscription_id)
            .returning(CheckoutSession.subscription_id)
        )
        if bound is None:  # bound meanwhile by a concurrent event
            bound = await ctx.session.scalar(
                select(CheckoutSession.subscription_id).where(CheckoutSession.id == checkout.id)
            )
        return bound == subscription_id
    return checkout.subscription_id == subscription_id


async def find_owner(
    ctx: WebhookContext,
    *,
    what: str,
    object_id: str,
    checkout: RecordedCheckout | None,
    subscription_id: str | None,
    customer: str | None,
) -> UUID:
    """The user an event is for, or EventIgnored: the one whose checkout it comes from, else the one whose profile
    holds the subscription or the customer (grants made before checkouts were recorded). The customer is linked
    to the profile when it has none, and the event to the user (for support)."""
    found = checkout.profile_id if checkout is not None else None
    if found is None and subscription_id:
        found = await ctx.session.scalar(select(Profile.id).where(Profile.subscription_id == subscription_id))
    if found is None and customer:
        found = await ctx.session.scalar(select(Profile.id).where(Profile.stripe_customer_id == customer))
    if found is None:
        logger.warning("Stripe %s %s: no user found", what, object_id)
        raise EventIgnored(f"no user found for this {what}")
    if customer:
        other = aliased(Profile)
        await ctx.session.execute(
            update(Profile)
            .where(
                Profile.id == found,
                Profile.stripe_customer_id.is_(None),
                ~exists().where(other.stripe_customer_id == customer),
            )
            .values(stripe_customer_id=customer)
        )
    await note_owner(ctx, found)
    return found


async def note_owner(ctx: WebhookContext, owner: UUID) -> None:
    """Which user the event concerned, on its stripe_events row: support finds a user's events by it."""
    await ctx.session.execute(update(StripeEvent).where(StripeEvent.id == ctx.event_id).values(profile_id=owner))
