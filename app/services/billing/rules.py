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

    def metadata(self, user_id: str, reference: str) -> dict[str, str]:
        """Written on the checkout and its subscription: our reference to the recorded checkout (which holds what
        it sold, so a price later taken out of the catalogue still grants what the customer bought), and the rest
        for people reading Stripe's dashboard."""
        return {
            "checkout_reference": reference,
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


def plan_lines(
    catalogue: Catalogue, invoice: Invoice, sold: tuple[str, CatalogueItem] | None
) -> list[tuple[CatalogueItem, int]]:
    """The plans an invoice charges a period of, with their quantities (prorations and one-off items left out):
    what the subscription's checkout sold for its price (`sold`: price id and item), the catalogue's plan for
    another price (a plan changed in the portal), and for subscriptions from before checkouts were recorded, what
    their metadata says was sold."""
    found = []
    for line in invoice.lines.data:
        price_id = line.price_id
        if price_id is None or not line.charges_a_subscription_period:
            continue
        if sold is not None and price_id == sold[0]:
            plan: CatalogueItem | None = sold[1]
        else:
            plan = catalogue.plans.get(price_id) or (sold_item(invoice.metadata, price_id) if sold is None else None)
        if plan is not None:
            found.append((plan, line.units))
    return found


def share(credits: int, part: int, whole: int) -> int:
    """round(credits x part / whole), halves up, in whole numbers: a refunded or disputed share of a grant."""
    if whole <= 0:
        return credits
    return (2 * credits * part + whole) // (2 * whole)


# --- Subscription state ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    subscription_id: str
    status: str
    price_id: str | None
    current_period_end: datetime | None
    cancel_at_period_end: bool


def _time(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def subscription_state(catalogue: Catalogue, subscription: Subscription) -> SubscriptionState:
    """The state to store for a subscription as Stripe's API reports it: its catalogue plan's item (else its
    first), and whether it ends."""
    items = subscription.items.data
    item = next((i for i in items if i.price and i.price.id in catalogue.plans), items[0] if items else None)
    # 2025-03-31+: the period is per item; before, on the subscription.
    period_end = _time(item.current_period_end if item else None) or _time(subscription.current_period_end)
    status = subscription.status
    # `cancel_at` set (the portal may use it instead of cancel_at_period_end) also means "will not renew".
    ending = subscription.cancel_at_period_end or subscription.cancel_at is not None
    price_id = item.price.id if item and item.price else None
    return SubscriptionState(subscription.id, status, price_id, period_end, ending and status not in ENDED_STATUSES)


def hides_live_subscription(stored_id: str | None, stored_status: str | None, state: SubscriptionState) -> bool:
    """Whether storing `state` would hide another subscription of the profile's that is still live: a second,
    ended subscription (an old one, or one that failed at checkout) never replaces a live one on the profile."""
    stored_live = stored_id is not None and stored_status not in ENDED_STATUSES
    return stored_live and stored_id != state.subscription_id and state.status in ENDED_STATUSES
