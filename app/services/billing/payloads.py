"""The parts of Stripe's payloads we read, as typed models, in the shapes of every API version an endpoint may
be pinned to. From 2025-03-31 (the pinned library's version and newer) an invoice names its subscription under
`parent.subscription_details` and a line its price under `pricing.price_details`, and the billing period is on
the subscription items; older versions put these at the top level (and older still name a line's price only
under `plan`). Each property below reads the newer place first."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _id_of(value: Any) -> Any:
    """An object's id, whether Stripe sent the id or the expanded object."""
    if isinstance(value, dict):
        return value.get("id")
    return value or None


# A reference to another Stripe object: its id, or the object expanded.
ObjectId = Annotated[str | None, BeforeValidator(_id_of)]
# Stripe times are whole seconds since the epoch; anything else is refused (a 1e15 is no time).
Timestamp = Annotated[int, Field(ge=0, le=253_402_300_799)]  # up to the year 9999
# Money in the currency's smallest unit; quantities. Both fit a bigint.
Amount = Annotated[int, Field(ge=0, le=2**62)]
Metadata = dict[str, str]


class StripeModel(BaseModel):
    # Stripe adds fields in every version: read what we know, keep nothing else.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Event(StripeModel):
    id: str = Field(min_length=1)
    type: str = Field(min_length=1)
    created: Timestamp
    data: EventData

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self.created, UTC)


class EventData(StripeModel):
    object: dict[str, Any]


class CheckoutSession(StripeModel):
    id: str = Field(min_length=1)
    mode: str | None = None
    payment_status: str | None = None
    customer: ObjectId = None
    subscription: ObjectId = None
    payment_intent: ObjectId = None
    amount_total: Amount | None = None
    currency: str | None = None
    metadata: Metadata = Field(default_factory=dict)
    # Not Stripe's: the subscription a subscription checkout started, as Stripe's API reports it now.
    subscription_state: Subscription | None = None


class _SubscriptionDetails(StripeModel):
    # Its id, or the subscription itself when the invoice was fetched with it expanded.
    subscription: str | Subscription | None = None
    metadata: Metadata = Field(default_factory=dict)


class _InvoiceParent(StripeModel):
    subscription_details: _SubscriptionDetails | None = None


class _PriceDetails(StripeModel):
    price: ObjectId = None


class _LinePricing(StripeModel):
    price_details: _PriceDetails | None = None


class _SubscriptionItemDetails(StripeModel):
    proration: bool = False


class _LineParent(StripeModel):
    type: str | None = None
    subscription_item_details: _SubscriptionItemDetails | None = None


class InvoiceLine(StripeModel):
    quantity: Amount | None = None
    pricing: _LinePricing | None = None
    parent: _LineParent | None = None
    # Before 2025-03-31.
    type: str | None = None
    proration: bool = False
    price: ObjectId = None
    plan: ObjectId = None

    @property
    def price_id(self) -> str | None:
        details = self.pricing.price_details if self.pricing else None
        return (details.price if details else None) or self.price or self.plan

    @property
    def charges_a_subscription_period(self) -> bool:
        """A subscription item's regular charge (not a proration, not a one-off invoice item)."""
        if self.parent is not None:
            details = self.parent.subscription_item_details
            return self.parent.type == "subscription_item_details" and not (details and details.proration)
        return self.type == "subscription" and not self.proration

    @property
    def units(self) -> int:
        return self.quantity if self.quantity and self.quantity > 0 else 1


class _Lines(StripeModel):
    data: list[InvoiceLine] = Field(default_factory=list)


class _PaymentReference(StripeModel):
    payment_intent: ObjectId = None


class InvoicePayment(StripeModel):
    status: str | None = None
    amount_paid: Amount | None = None
    currency: str | None = None
    payment: _PaymentReference | None = None


class _Payments(StripeModel):
    data: list[InvoicePayment] = Field(default_factory=list)


class Invoice(StripeModel):
    id: str = Field(min_length=1)
    customer: ObjectId = None
    parent: _InvoiceParent | None = None
    lines: _Lines = Field(default_factory=_Lines)
    # 2025-03-31+: a list of its own, present when the invoice was fetched with it expanded.
    payments: _Payments | None = None
    # Before 2025-03-31.
    subscription: str | Subscription | None = None
    subscription_details: _SubscriptionDetails | None = None
    payment_intent: ObjectId = None
    amount_paid: Amount | None = None
    currency: str | None = None

    @property
    def _details(self) -> _SubscriptionDetails | None:
        newer = self.parent.subscription_details if self.parent else None
        return newer or self.subscription_details

    @property
    def _subscription(self) -> str | Subscription | None:
        details = self.parent.subscription_details if self.parent else None
        return details.subscription if details else self.subscription

    @property
    def subscription_id(self) -> str | None:
        found = self._subscription
        return found.id if isinstance(found, Subscription) else found

    @property
    def expanded_subscription(self) -> Subscription | None:
        found = self._subscription
        return found if isinstance(found, Subscription) else None

    @property
    def paid_with(self) -> tuple[str, int, str | None] | None:
        """The PaymentIntent that paid it, the amount, the currency: from its payments list (2025-03-31+), else
        from the invoice itself (older versions)."""
        paid = [p for p in self.payments.data if p.status == "paid"] if self.payments else []
        for payment in paid:
            if payment.payment and payment.payment.payment_intent and payment.amount_paid is not None:
                return payment.payment.payment_intent, payment.amount_paid, payment.currency
        if self.payment_intent and self.amount_paid is not None:
            return self.payment_intent, self.amount_paid, self.currency
        return None

    @property
    def metadata(self) -> Metadata:
        """The subscription's metadata as it was when the invoice was made (our checkout put the user there)."""
        details = self._details
        return details.metadata if details else {}


class _Price(StripeModel):
    id: str


class SubscriptionItem(StripeModel):
    price: _Price | None = None
    current_period_end: Timestamp | None = None


class _Items(StripeModel):
    data: list[SubscriptionItem] = Field(default_factory=list)


class Subscription(StripeModel):
    """As Stripe's API returns it now (the webhook's copy may be older than the state)."""

    id: str = Field(min_length=1)
    status: str = "incomplete"
    customer: ObjectId = None
    cancel_at_period_end: bool = False
    cancel_at: Timestamp | None = None
    metadata: Metadata = Field(default_factory=dict)
    items: _Items = Field(default_factory=_Items)
    # Before 2025-03-31: the period is on the subscription rather than on its items.
    current_period_end: Timestamp | None = None


class Charge(StripeModel):
    id: str = Field(min_length=1)
    payment_intent: ObjectId = None
    amount: Amount
    amount_refunded: Amount = 0
    currency: str | None = None


class Dispute(StripeModel):
    id: str = Field(min_length=1)
    charge: ObjectId = None
    payment_intent: ObjectId = None
    amount: Amount
    status: str


Event.model_rebuild()
CheckoutSession.model_rebuild()
_SubscriptionDetails.model_rebuild()
Invoice.model_rebuild()
