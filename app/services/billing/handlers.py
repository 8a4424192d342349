"""What each Stripe event we handle does. Credits always come from the catalogue (or what our own checkout
recorded it sold), never from the client."""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from sqlalchemy import select, update

from app.database import SessionQueries
from app.models import CreditKind, Profile
from app.services import credits
from app.services.billing.events import EventIgnored, Handler, WebhookContext, find_owner
from app.services.billing.payloads import CheckoutSession, Event, Invoice, Subscription
from app.services.billing.rules import (
    PAID_CHECKOUT,
    StoredSubscription,
    SubscriptionState,
    pack_sold,
    plan_lines,
    subscription_state,
    why_not_applied,
)
from app.services.profiles import ProfileNotFound

logger = logging.getLogger(__name__)


# --- Checkout Sessions ---------------------------------------------------------------------------------------


async def _checkout_completed(ctx: WebhookContext, event: Event, checkout: CheckoutSession) -> str:
    user_id = await find_owner(ctx, checkout.user_id, checkout.customer, "checkout session", checkout.id)
    if checkout.mode == "payment":
        if checkout.payment_status not in PAID_CHECKOUT:
            return "waiting: the payment is not complete yet (async_payment_succeeded will grant the pack)"
        return await _grant_pack(ctx, user_id, checkout)
    if checkout.mode == "subscription":
        if checkout.subscription is None:
            raise EventIgnored("subscription checkout without a subscription")
        status = "active" if checkout.payment_status in PAID_CHECKOUT else "incomplete"
        state = SubscriptionState(checkout.subscription, status, checkout.metadata.get("price_id"), None, None)
        # The subscription's own events carry its full state; this only links a subscription not seen yet.
        return await _apply_subscription_state(ctx, user_id, state, event, only_if_new=True)
    raise EventIgnored(f"checkout mode {checkout.mode!r}")


async def _grant_pack(ctx: WebhookContext, user_id: UUID, checkout: CheckoutSession) -> str:
    pack = pack_sold(ctx.catalogue, checkout.metadata)
    if pack is None:
        price_id = checkout.metadata.get("price_id")
        logger.error(
            "Stripe checkout session %s was paid for price %r, which is not in CREDIT_PACKS: no credits granted",
            checkout.id,
            price_id,
        )
        raise EventIgnored(f"price {price_id!r} is not in CREDIT_PACKS")
    db = SessionQueries(ctx.session)
    entry = await credits.grant(db, user_id, pack.credits, CreditKind.PURCHASE, checkout.id, pack.name)
    return f"granted {pack.credits} credits" if entry else "already granted"


async def _checkout_payment_failed(ctx: WebhookContext, event: Event, checkout: CheckoutSession) -> str:
    logger.warning("Stripe checkout session %s: the delayed payment failed; no credits granted", checkout.id)
    return "payment failed: no credits granted"


# --- Invoices ------------------------------------------------------------------------------------------------


def _subscription_of(invoice: Invoice) -> str:
    if invoice.subscription_id is None:
        raise EventIgnored("not a subscription invoice")
    return invoice.subscription_id


async def _invoice_paid(ctx: WebhookContext, event: Event, invoice: Invoice) -> str:
    subscription_id = _subscription_of(invoice)
    plans = plan_lines(ctx.catalogue, invoice)
    if not plans:
        logger.error(
            "Stripe invoice %s (subscription %s) has no price from SUBSCRIPTION_PLANS: no credits granted",
            invoice.id,
            subscription_id,
        )
        raise EventIgnored("no SUBSCRIPTION_PLANS price on this invoice")
    user_id = await find_owner(ctx, invoice.metadata.get("user_id"), invoice.customer, "invoice", invoice.id)
    amount = sum(plan.credits * quantity for plan, quantity in plans)
    note = ", ".join(plan.name for plan, _ in plans)[:500]
    db = SessionQueries(ctx.session)
    entry = await credits.grant(db, user_id, amount, CreditKind.SUBSCRIPTION_GRANT, invoice.id, note)
    return f"granted {amount} credits" if entry else "already granted"


async def _invoice_payment_failed(ctx: WebhookContext, event: Event, invoice: Invoice) -> str:
    subscription_id = _subscription_of(invoice)
    user_id = await find_owner(ctx, invoice.metadata.get("user_id"), invoice.customer, "invoice", invoice.id)
    state = SubscriptionState(subscription_id, "past_due", None, None, None)
    return await _apply_subscription_state(ctx, user_id, state, event, same_subscription_only=True)


# --- Subscriptions -------------------------------------------------------------------------------------------


async def _subscription_changed(ctx: WebhookContext, event: Event, subscription: Subscription) -> str:
    deleted = event.type == "customer.subscription.deleted"
    state = subscription_state(ctx.catalogue, subscription, deleted=deleted)
    user_id = await find_owner(
        ctx, subscription.metadata.get("user_id"), subscription.customer, "subscription", subscription.id
    )
    return await _apply_subscription_state(ctx, user_id, state, event)


async def _apply_subscription_state(
    ctx: WebhookContext,
    user_id: UUID,
    state: SubscriptionState,
    event: Event,
    *,
    only_if_new: bool = False,
    same_subscription_only: bool = False,
) -> str:
    # Locked, so two events for one profile are compared and written one after the other.
    profile = await ctx.session.scalar(
        select(Profile).where(Profile.id == user_id).with_for_update().execution_options(populate_existing=True)
    )
    if profile is None:
        raise ProfileNotFound
    same = profile.subscription_id == state.subscription_id
    if only_if_new and same:
        return "subscription already linked"
    if same_subscription_only and profile.subscription_id is not None and not same:
        raise EventIgnored("not the profile's current subscription")
    stored = StoredSubscription(profile.subscription_id, profile.subscription_status, profile.subscription_event_at)
    refused = why_not_applied(stored, state, event.created_at)
    if refused:
        return refused
    values: dict[str, Any] = {
        "subscription_id": state.subscription_id,
        "subscription_status": state.status,
        "subscription_price_id": state.price_id,
        "subscription_current_period_end": state.current_period_end,
        "subscription_cancel_at_period_end": state.cancel_at_period_end or False,
        "subscription_event_at": event.created_at,
    }
    if same:  # what this event does not say about the stored subscription stays as it is
        if state.price_id is None:
            del values["subscription_price_id"]
        if state.current_period_end is None:
            del values["subscription_current_period_end"]
        if state.cancel_at_period_end is None:
            del values["subscription_cancel_at_period_end"]
    await ctx.session.execute(update(Profile).where(Profile.id == user_id).values(**values))
    return f"subscription {state.subscription_id} is {state.status}"


HANDLERS: dict[str, Handler[Any]] = {
    "checkout.session.completed": Handler(CheckoutSession, _checkout_completed),
    "checkout.session.async_payment_succeeded": Handler(CheckoutSession, _checkout_completed),
    "checkout.session.async_payment_failed": Handler(CheckoutSession, _checkout_payment_failed),
    "invoice.paid": Handler(Invoice, _invoice_paid),
    "invoice.payment_failed": Handler(Invoice, _invoice_payment_failed),
    "customer.subscription.created": Handler(Subscription, _subscription_changed),
    "customer.subscription.updated": Handler(Subscription, _subscription_changed),
    "customer.subscription.deleted": Handler(Subscription, _subscription_changed),
}
HANDLED_EVENTS = tuple(HANDLERS)
