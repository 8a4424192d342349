"""Events that take credits back: a refund takes the refunded share of the grant it undoes, a dispute its share
while it is open (Stripe withdraws the money when it opens) and gives it back when the dispute closes in our
favour. A take-back happens in full even when the credits were spent: the balance then owes.

Each acts once however often Stripe delivers it: a refund's share is cumulative per payment (the charge carries
what was refunded in all), and each dispute is recorded once with what it took back. Stripe does not promise
order: an event about a grant not recorded yet is answered 503, so Stripe retries it once the grant is there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert

from app.database import SessionQueries
from app.models import CheckoutSession, CreditEntry, CreditKind, Profile, StripeDispute, StripePayment
from app.services import credits
from app.services.billing.events import EventIgnored, NotYet, WebhookContext, note_owner
from app.services.billing.payloads import Charge, Dispute, Event, Invoice
from app.services.billing.rules import share
from app.services.billing.stripe_api import fetch

logger = logging.getLogger(__name__)

# A dispute closed without a loss gives back what it took: won, or an inquiry closed without becoming a dispute.
RETURNED_WHEN = frozenset({"won", "warning_closed"})


@dataclass(frozen=True, slots=True)
class GrantSource:
    """What a payment paid for, as Stripe's API tells it: a checkout session or an invoice."""

    kind: CreditKind
    reference: str
    amount_paid: int | None
    currency: str | None
    subscription_id: str | None = None


async def _grant_source(ctx: WebhookContext, payment_intent: str) -> GrantSource | None:
    """For grants made before payments were recorded: the checkout session, else the invoice, it paid for."""
    client = ctx.client
    sessions = await fetch(
        "find the checkout of a payment",
        client.v1.checkout.sessions.list_async({"payment_intent": payment_intent, "limit": 1}),
    )
    for session in (sessions or {}).get("data", []):
        return GrantSource(CreditKind.PURCHASE, session["id"], session.get("amount_total"), session.get("currency"))
    params: Any = {"payment": {"type": "payment_intent", "payment_intent": payment_intent}, "expand": ["data.invoice"]}
    payments = await fetch("find the invoice of a payment", client.v1.invoice_payments.list_async(params))
    for payment in (payments or {}).get("data", []):
        invoice = Invoice.model_validate(payment["invoice"])
        kind = CreditKind.SUBSCRIPTION_GRANT
        return GrantSource(
            kind, invoice.id, payment.get("amount_paid"), payment.get("currency"), invoice.subscription_id
        )
    return None


async def _sold_by_us(ctx: WebhookContext, source: GrantSource) -> bool:
    if source.kind is CreditKind.PURCHASE:
        found = await ctx.session.scalar(select(CheckoutSession.id).where(CheckoutSession.id == source.reference))
        return found is not None
    if source.subscription_id is None:
        return False
    by_checkout = select(CheckoutSession.id).where(CheckoutSession.subscription_id == source.subscription_id)
    by_profile = select(Profile.id).where(Profile.subscription_id == source.subscription_id)
    return (await ctx.session.scalar(by_checkout)) is not None or (await ctx.session.scalar(by_profile)) is not None


async def _payment(ctx: WebhookContext, payment_intent: str | None, charged: int) -> StripePayment:
    """The granted payment an event is about, locked until the transaction ends. A grant recorded before payments
    were is found through Stripe's API and its payment recorded now. NotYet when the grant is still to come;
    EventIgnored for a payment that paid for nothing this service sold."""
    if payment_intent is None:
        raise EventIgnored("a payment without a PaymentIntent: nothing of ours")
    locked = select(StripePayment).where(StripePayment.id == payment_intent).with_for_update()
    payment = await ctx.session.scalar(locked)
    if payment is not None:
        await note_owner(ctx, payment.profile_id)
        return payment
    source = await _grant_source(ctx, payment_intent)
    if source is None:
        raise EventIgnored(f"payment {payment_intent} did not pay for anything this service sold")
    grant = (
        await ctx.session.execute(
            select(CreditEntry.profile_id, CreditEntry.amount).where(
                CreditEntry.kind == source.kind.value, CreditEntry.reference == source.reference
            )
        )
    ).one_or_none()
    if grant is None:
        if await _sold_by_us(ctx, source):
            raise NotYet(f"the grant for {source.reference} is not recorded yet: try again later")
        raise EventIgnored(f"payment {payment_intent} did not pay for anything this service granted")
    await ctx.session.execute(
        insert(StripePayment)
        .values(
            id=payment_intent,
            profile_id=grant.profile_id,
            grant_kind=source.kind.value,
            grant_reference=source.reference,
            credits_granted=grant.amount,
            amount_paid=source.amount_paid if source.amount_paid is not None else charged,
            currency=source.currency,
        )
        .on_conflict_do_nothing(index_elements=[StripePayment.id])
    )
    found = await ctx.session.scalar(locked.execution_options(populate_existing=True))
    assert found is not None  # inserted above, or by a concurrent event
    await note_owner(ctx, found.profile_id)
    return found


async def _move(ctx: WebhookContext, payment: StripePayment, amount: int, kind: CreditKind, reference: str) -> None:
    note = f"{kind.value.replace('_', ' ')} of {payment.grant_reference}"
    entry = await credits.move_balance(
        SessionQueries(ctx.session), payment.profile_id, amount, kind, reference, note, checked=False
    )
    assert entry is not None  # the payment's profile exists (deleting it deletes the payment)


async def charge_refunded(ctx: WebhookContext, event: Event, charge: Charge) -> str:
    payment = await _payment(ctx, charge.payment_intent, charge.amount)
    granted = payment.credits_granted
    refunded = share(granted, charge.amount_refunded, payment.amount_paid)
    # Never more than was granted, with what open or lost disputes took.
    target = min(refunded, granted - payment.credits_disputed)
    taken = target - payment.credits_refunded
    if taken <= 0:
        return "nothing more to take back"
    await _move(ctx, payment, -taken, CreditKind.REFUND, charge.id)
    await ctx.session.execute(
        update(StripePayment)
        .where(StripePayment.id == payment.id)
        .values(credits_refunded=payment.credits_refunded + taken, amount_refunded=charge.amount_refunded)
    )
    return f"took back {taken} credits: refunded {charge.amount_refunded} of {payment.amount_paid}"


async def dispute_created(ctx: WebhookContext, event: Event, dispute: Dispute) -> str:
    payment = await _payment(ctx, dispute.payment_intent, dispute.amount)
    granted = payment.credits_granted
    taken = min(
        share(granted, dispute.amount, payment.amount_paid),
        granted - payment.credits_refunded - payment.credits_disputed,
    )
    recorded = await ctx.session.scalar(
        insert(StripeDispute)
        .values(id=dispute.id, payment_id=payment.id, credits=taken, status=dispute.status)
        .on_conflict_do_nothing(index_elements=[StripeDispute.id])
        .returning(StripeDispute.id)
    )
    if recorded is None:
        return "dispute already recorded"
    if taken > 0:
        await _move(ctx, payment, -taken, CreditKind.DISPUTE, dispute.id)
        await ctx.session.execute(
            update(StripePayment)
            .where(StripePayment.id == payment.id)
            .values(credits_disputed=payment.credits_disputed + taken)
        )
    return f"took back {taken} credits while the dispute is open"


async def dispute_closed(ctx: WebhookContext, event: Event, dispute: Dispute) -> str:
    recorded = await ctx.session.scalar(select(StripeDispute).where(StripeDispute.id == dispute.id).with_for_update())
    if recorded is None:
        await _payment(ctx, dispute.payment_intent, dispute.amount)  # ignored when not ours
        raise NotYet(f"dispute {dispute.id} opened in an event not processed yet: try again later")
    if recorded.returned or recorded.status in {"won", "lost", "warning_closed"}:
        return f"dispute already closed ({recorded.status})"
    await ctx.session.execute(update(StripeDispute).where(StripeDispute.id == dispute.id).values(status=dispute.status))
    if dispute.status not in RETURNED_WHEN or recorded.credits == 0:
        return f"dispute {dispute.status}: nothing more changes"
    payment = await _payment(ctx, recorded.payment_id, dispute.amount)
    await _move(ctx, payment, recorded.credits, CreditKind.DISPUTE_REVERSAL, dispute.id)
    await ctx.session.execute(update(StripeDispute).where(StripeDispute.id == dispute.id).values(returned=True))
    await ctx.session.execute(
        update(StripePayment)
        .where(StripePayment.id == payment.id)
        .values(credits_disputed=payment.credits_disputed - recorded.credits)
    )
    return f"gave back {recorded.credits} credits: the dispute was {dispute.status}"
