"""Billing's pure rules: what a price sells, which invoice lines grant credits, which subscription state wins.
No I/O here, so each rule is tested on its own."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from app.config import Catalogue, CatalogueItem
from app.errors import AppError
from app.services.billing.payloads import Invoice, Metadata, Subscription

# Subscription statuses after which nothing more happens to that subscription.
ENDED_STATUSES = frozenset({"canceled", "incomplete_expired"})
PAID_CHECKOUT = frozenset({"paid", "no_payment_required"})

Mode = Literal["payment", "subscription"]


class UnknownPrice(AppError):
    status_code = 422

    def __init__(self, price_id: str) -> None:
        super().__init__(f"unknown price_id {price_id!r}: choose one from GET /billing/plans")


@dataclass(frozen=True, slots=True)
class Offer:
    price_id: str
    item: CatalogueItem
    mode: Mode

    def metadata(self, user_id: str) -> dict[str, str]:
        """What the checkout records it sold, so a price later taken out of the catalogue still grants what
        the customer bought (a subscription's renewals, a delayed payment)."""
        return {
            "user_id": user_id,
            "price_id": self.price_id,
            "credits": str(self.item.credits),
            "name": self.item.name,
        }


def find_offer(catalogue: Catalogue, price_id: str) -> Offer:
    """The catalogue entry for `price_id` (a pack is bought once, a plan is a subscription), or 422."""
    if price_id in catalogue.packs:
        return Offer(price_id, catalogue.packs[price_id], "payment")
    if price_id in catalogue.plans:
        return Offer(price_id, catalogue.plans[price_id], "subscription")
    raise UnknownPrice(price_id)


def sold_item(metadata: Metadata, price_id: str | None) -> CatalogueItem | None:
    """What our checkout recorded it sold for `price_id`, if it did (see `Offer.metadata`)."""
    if price_id is None or metadata.get("price_id") != price_id:
        return None
    try:
        return CatalogueItem(name=metadata.get("name") or price_id, credits=int(metadata.get("credits", "")))
    except ValueError:  # not a whole number in range: not ours
        return None


def pack_sold(catalogue: Catalogue, metadata: Metadata) -> CatalogueItem | None:
    price_id = metadata.get("price_id")
    return (catalogue.packs.get(price_id) if price_id else None) or sold_item(metadata, price_id)


def plan_lines(catalogue: Catalogue, invoice: Invoice) -> list[tuple[CatalogueItem, int]]:
    """The plans an invoice charges a period of, with their quantities (prorations left out): from the
    catalogue, or, for a price since retired, what the subscription's checkout sold."""
    found = []
    for line in invoice.lines.data:
        price_id = line.price_id
        plan = (catalogue.plans.get(price_id) if price_id else None) or sold_item(invoice.metadata, price_id)
        if plan is not None and line.charges_a_subscription_period:
            found.append((plan, line.units))
    return found


# --- Subscription state ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    subscription_id: str
    status: str
    # None: not known from this event (kept when it is about the stored subscription).
    price_id: str | None
    current_period_end: datetime | None
    cancel_at_period_end: bool | None


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    subscription_id: str | None
    status: str | None
    event_at: datetime | None


def _time(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def subscription_state(catalogue: Catalogue, subscription: Subscription, *, deleted: bool) -> SubscriptionState:
    """The state to store for a subscription: its catalogue plan's item (else its first), and whether it ends."""
    items = subscription.items.data
    item = next((i for i in items if i.price and i.price.id in catalogue.plans), items[0] if items else None)
    # 2025-03-31+: the period is per item; before, on the subscription.
    period_end = _time(item.current_period_end if item else None) or _time(subscription.current_period_end)
    status = "canceled" if deleted else subscription.status
    # `cancel_at` set (the portal may use it instead of cancel_at_period_end) also means "will not renew".
    ending = subscription.cancel_at_period_end or subscription.cancel_at is not None
    price_id = item.price.id if item and item.price else None
    return SubscriptionState(subscription.id, status, price_id, period_end, ending and status not in ENDED_STATUSES)


def _lifecycle(status: str | None) -> int:
    """Order within one subscription's life, to settle two events stamped in the same second."""
    if status == "incomplete":
        return 0
    return 2 if status in ENDED_STATUSES else 1


def why_not_applied(stored: StoredSubscription, state: SubscriptionState, at: datetime) -> str | None:
    """Why an event at `at` may not replace the stored subscription state (an older one never does); None if it may."""
    if stored.event_at is None or stored.subscription_id is None:
        return None
    if stored.subscription_id != state.subscription_id:
        stored_live = stored.status not in ENDED_STATUSES
        new_live = state.status not in ENDED_STATUSES
        if stored_live and not new_live:  # another subscription ending never hides a live one
            return f"ignored: subscription {stored.subscription_id} is live"
        if new_live and not stored_live:  # and a live one replaces an ended one
            return None
        return None if at >= stored.event_at else "ignored: older than the stored subscription state"
    if at > stored.event_at or (at == stored.event_at and _lifecycle(state.status) >= _lifecycle(stored.status)):
        return None
    return "ignored: older than the stored subscription state"
