"""Which Stripe events are handled, and by what: the payload each is read into, what is fetched from Stripe's
API first, and what is done."""

from __future__ import annotations

from typing import Any

from app.services.billing import grants, subscriptions, takebacks
from app.services.billing.events import Handler
from app.services.billing.payloads import Charge, CheckoutSession, Dispute, Invoice, Subscription

_PAID_CHECKOUT = Handler(CheckoutSession, grants.checkout_completed, grants.fetch_checkout_subscription)
# Stripe sends both for one payment (an endpoint may subscribe to either): the grant is once per invoice.
_PAID_INVOICE = Handler(Invoice, grants.invoice_paid, grants.fetch_invoice)
_SUBSCRIPTION = Handler(Subscription, subscriptions.subscription_changed, subscriptions.fetch_subscription)

HANDLERS: dict[str, Handler[Any]] = {
    "checkout.session.completed": _PAID_CHECKOUT,
    "checkout.session.async_payment_succeeded": _PAID_CHECKOUT,
    "checkout.session.async_payment_failed": Handler(CheckoutSession, grants.checkout_payment_failed),
    "invoice.paid": _PAID_INVOICE,
    "invoice.payment_succeeded": _PAID_INVOICE,
    "invoice.payment_failed": Handler(Invoice, grants.invoice_payment_failed, grants.fetch_invoice),
    "customer.subscription.created": _SUBSCRIPTION,
    "customer.subscription.updated": _SUBSCRIPTION,
    "customer.subscription.deleted": _SUBSCRIPTION,
    "charge.refunded": Handler(Charge, takebacks.charge_refunded),
    "charge.dispute.created": Handler(Dispute, takebacks.dispute_created),
    "charge.dispute.closed": Handler(Dispute, takebacks.dispute_closed),
}
HANDLED_EVENTS = tuple(HANDLERS)
