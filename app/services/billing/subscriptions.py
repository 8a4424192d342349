"""A profile's subscription, as Stripe's API reports it when an event concerns it. Stripe does not deliver events
in order, and one event can carry less than another: rather than reason about which is newer, each one reads the
subscription's current state and stores that, so every order of delivery ends in the same state, Stripe's."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import select, update

from app.models import Profile
from app.services.billing.events import (
    EventIgnored,
    WebhookContext,
    bind_subscription,
    find_owner,
    recorded_checkout,
)
from app.services.billing.payloads import Event, Subscription
from app.services.billing.rules import hides_live_subscription, subscription_state
from app.services.billing.stripe_api import fetch
from app.services.profiles import ProfileNotFound


async def store_subscription(ctx: WebhookContext, owner: UUID, subscription: Subscription) -> str:
    """Store a subscription's state on its owner's profile (unless another, live subscription is there)."""
    state = subscription_state(ctx.catalogue, subscription)
    # Locked, so two events for one profile are applied one after the other.
    stored = (
        await ctx.session.execute(
            select(Profile.subscription_id, Profile.subscription_status).where(Profile.id == owner).with_for_update()
        )
    ).one_or_none()
    if stored is None:
        raise ProfileNotFound
    if hides_live_subscription(stored.subscription_id, stored.subscription_status, state):
        raise EventIgnored(f"subscription {stored.subscription_id} is live")
    await ctx.session.execute(
        update(Profile)
        .where(Profile.id == owner)
        .values(
            subscription_id=state.subscription_id,
            subscription_status=state.status,
            subscription_price_id=state.price_id,
            subscription_current_period_end=state.current_period_end,
            subscription_cancel_at_period_end=state.cancel_at_period_end,
        )
    )
    return f"subscription {state.subscription_id} is {state.status}"


async def fetch_subscription(ctx: WebhookContext, subscription: Subscription) -> Subscription:
    """The subscription as Stripe's API reports it now (the event's own copy if Stripe no longer has it)."""
    found = await fetch("read the subscription", ctx.client.v1.subscriptions.retrieve_async(subscription.id))
    return Subscription.model_validate(found) if found is not None else subscription


async def subscription_changed(ctx: WebhookContext, event: Event, subscription: Subscription) -> str:
    checkout = await recorded_checkout(ctx, metadata=subscription.metadata)
    if checkout is not None and not await bind_subscription(ctx, checkout, subscription.id):
        raise EventIgnored(f"subscription {subscription.id} was not started by checkout {checkout.id}")
    owner = await find_owner(
        ctx,
        what="subscription",
        object_id=subscription.id,
        checkout=checkout,
        subscription_id=subscription.id,
        customer=subscription.customer,
    )
    return await store_subscription(ctx, owner, subscription)
