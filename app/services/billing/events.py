"""What every webhook handler shares: its context, how it declares what it reads, and the one step most of
them begin with, finding the user an event is for."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar
from uuid import UUID

from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.auth import User
from app.config import Catalogue, SignupGrants
from app.models import Profile
from app.services import profiles
from app.services.billing.payloads import Event, StripeModel

logger = logging.getLogger(__name__)


class EventIgnored(Exception):
    """Raised by a handler that finds nothing to do; the message says why, and is the event's outcome."""


@dataclass(frozen=True, slots=True)
class WebhookContext:
    """What every handler may use: the request's session, what we sell, and the credits a new profile gets."""

    session: AsyncSession
    catalogue: Catalogue
    grants: SignupGrants


Payload = TypeVar("Payload", bound=StripeModel)


@dataclass(frozen=True, slots=True)
class Handler(Generic[Payload]):
    """How to act on one event type: the payload model its object is read into, and what to do with it."""

    payload: type[Payload]
    apply: Callable[[WebhookContext, Event, Payload], Awaitable[str]]


async def find_owner(ctx: WebhookContext, user_id: str | None, customer: str | None, what: str, object_id: str) -> UUID:
    """The user an event is for, or EventIgnored: by the user id our checkout put in the metadata (their profile
    is created if missing, so paid credits have somewhere to go), else by the stored Stripe customer. The
    customer is linked to the profile when it has none."""
    found = await _user_by_metadata(ctx, user_id)
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
    return found


async def _user_by_metadata(ctx: WebhookContext, user_id: str | None) -> UUID | None:
    if not user_id:
        return None
    try:
        found = UUID(user_id)
    except ValueError:
        logger.warning("Stripe metadata user_id %r is not a UUID", user_id[:64])
        return None
    await profiles.get_or_create_profile(ctx.session, User(found), None, ctx.grants)
    return found
