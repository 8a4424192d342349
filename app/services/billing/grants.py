"""Events that grant credits: a paid checkout of a pack, and each paid invoice of a plan. Credits come from what
our own checkout recorded it sold (or the catalogue), never from the client or from metadata anyone could write;
each grant records the payment behind it, so a refund or a dispute finds it."""

from __future__ import annotations

import logging
from uuid import UUID

import stripe
from sqlalchemy.dialects.postgresql import insert

from app.database import SessionQueries
from app.models import CreditKind, StripePayment
from app.services import credits
from app.services.billing.events import (
    EventIgnored,
    RecordedCheckout,
    WebhookContext,
    bind_subscription,
    find_owner,
    recorded_checkout,
)
from app.services.billing.payloads import CheckoutSession, Event, Invoice, Subscription
from app.services.billing.rules import PAID_CHECKOUT, plan_lines
from app.services.billing.stripe_api import fetch
from app.services.billing.subscriptions import store_subscription

logger = logging.getLogger(__name__)


async def record_payment(
    ctx: WebhookContext,
    owner: UUID,
    paid: tuple[str, int, str | None] | None,
    kind: CreditKind,
    reference: str,
    credits_granted: int,
) -> None:
    """The payment behind a grant (PaymentIntent, amount, currency), once; nothing for a grant nobody paid for."""
    if paid is None:
        return
    payment_intent, amount, currency = paid
    await ctx.session.execute(
        insert(StripePayment)
        .values(
            id=payment_intent,
            profile_id=owner,
            grant_kind=kind.value,
            grant_reference=reference,
            credits_granted=credits_granted,
            amount_paid=amount,
            currency=currency,
        )
        .on_conflict_do_nothing(index_elements=[StripePayment.id])
    )


# --- Checkout Sessions -------------------------------------------------------------------------------------


def _ours(checkout: RecordedCheckout | None, session_id: str) -> RecordedCheckout:
    if checkout is None:
        logger.error("Stripe checkout session %s was not created by this service: nothing granted", session_id)
        raise EventIgnored(f"checkout session {session_id} was not created by this service")
    return checkout


async def fetch_checkout_subscription(ctx: WebhookContext, checkout: CheckoutSession) -> CheckoutSession:
    """A subscription checkout's subscription as it is now (its own events may come later, or came before)."""
    if checkout.mode != "subscription" or checkout.subscription is None:
        return checkout
    found = await fetch("read the subscription", ctx.client.v1.subscriptions.retrieve_async(checkout.subscription))
    state = Subscription.model_validate(found) if found is not None else None
    return checkout.model_copy(update={"subscription_state": state})


async def checkout_completed(ctx: WebhookContext, event: Event, checkout: CheckoutSession) -> str:
    ours = _ours(await recorded_checkout(ctx, session_id=checkout.id), checkout.id)
    owner = await find_owner(
        ctx,
        what="checkout session",
        object_id=checkout.id,
        checkout=ours,
        subscription_id=None,
        customer=checkout.customer,
    )
    if checkout.mode == "payment":
        if checkout.payment_status not in PAID_CHECKOUT:
            return "waiting: the payment is not complete yet (async_payment_succeeded will grant the pack)"
        db = SessionQueries(ctx.session)
        entry = await credits.grant(db, owner, ours.credits, CreditKind.PURCHASE, checkout.id, ours.name)
        paid = (
            (checkout.payment_intent, checkout.amount_total or 0, checkout.currency)
            if checkout.payment_intent
            else None
        )
        await record_payment(ctx, owner, paid, CreditKind.PURCHASE, checkout.id, ours.credits)
        return f"granted {ours.credits} credits" if entry else "already granted"
    if checkout.mode == "subscription" and checkout.subscription is not None:
        if not await bind_subscription(ctx, ours, checkout.subscription):
            raise EventIgnored(f"checkout {checkout.id} already started another subscription")
        if checkout.subscription_state is None:
            raise EventIgnored(f"subscription {checkout.subscription} does not exist at Stripe")
        return await store_subscription(ctx, owner, checkout.subscription_state)
    raise EventIgnored(f"checkout mode {checkout.mode!r} without what it needs")


async def checkout_payment_failed(ctx: WebhookContext, event: Event, checkout: CheckoutSession) -> str:
    logger.warning("Stripe checkout session %s: the delayed payment failed; no credits granted", checkout.id)
    return "payment failed: no credits granted"


# --- Invoices ------------------------------------------------------------------------------------------------


async def fetch_invoice(ctx: WebhookContext, invoice: Invoice) -> Invoice:
    """The invoice as it is now, in one call: with the payments that paid it (since 2025-03-31 a list of their
    own) and its subscription's current state."""
    if invoice.subscription_id is None:
        return invoice  # not a subscription's: nothing of ours to grant or to update
    params: stripe.params.InvoiceRetrieveParams = {"expand": ["payments", "parent.subscription_details.subscription"]}
    found = await fetch("read the invoice", ctx.client.v1.invoices.retrieve_async(invoice.id, params))
    return Invoice.model_validate(found) if found is not None else invoice


async def _invoice_owner(ctx: WebhookContext, invoice: Invoice, checkout: RecordedCheckout | None) -> UUID:
    """The user a subscription's invoice is for: the one whose checkout started the subscription, or (for one
    started before checkouts were recorded) whose profile holds it or its customer."""
    subscription_id = invoice.subscription_id
    if subscription_id is None:
        raise EventIgnored("not a subscription invoice")
    if checkout is not None and not await bind_subscription(ctx, checkout, subscription_id):
        raise EventIgnored(f"subscription {subscription_id} was not started by checkout {checkout.id}")
    return await find_owner(
        ctx,
        what="invoice",
        object_id=invoice.id,
        checkout=checkout,
        subscription_id=subscription_id,
        customer=invoice.customer,
    )


async def invoice_paid(ctx: WebhookContext, event: Event, invoice: Invoice) -> str:
    if invoice.subscription_id is None:
        raise EventIgnored("not a subscription invoice")
    checkout = await recorded_checkout(ctx, metadata=invoice.metadata)
    sold = (checkout.price_id, checkout.item) if checkout else None
    plans = plan_lines(ctx.catalogue, invoice, sold)
    if not plans:
        logger.error(
            "Stripe invoice %s (subscription %s) has no price from SUBSCRIPTION_PLANS: no credits granted",
            invoice.id,
            invoice.subscription_id,
        )
        raise EventIgnored("no SUBSCRIPTION_PLANS price on this invoice")
    owner = await _invoice_owner(ctx, invoice, checkout)
    amount = sum(plan.credits * quantity for plan, quantity in plans)
    note = ", ".join(plan.name for plan, _ in plans)[:500]
    entry = await credits.grant(
        SessionQueries(ctx.session), owner, amount, CreditKind.SUBSCRIPTION_GRANT, invoice.id, note
    )
    await record_payment(ctx, owner, invoice.paid_with, CreditKind.SUBSCRIPTION_GRANT, invoice.id, amount)
    outcome = f"granted {amount} credits" if entry else "already granted"
    if invoice.expanded_subscription is not None:
        outcome += "; " + await store_subscription(ctx, owner, invoice.expanded_subscription)
    return outcome


async def invoice_payment_failed(ctx: WebhookContext, event: Event, invoice: Invoice) -> str:
    owner = await _invoice_owner(ctx, invoice, await recorded_checkout(ctx, metadata=invoice.metadata))
    if invoice.expanded_subscription is None:
        raise EventIgnored(f"subscription {invoice.subscription_id} does not exist at Stripe")
    return await store_subscription(ctx, owner, invoice.expanded_subscription)
