"""Billing's pure rules, each on its own: what a price sells, which invoice lines grant, which subscription state
wins. The webhook tests cover them end to end; these pin the cases a refactor could break silently."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from app.config import Catalogue, CatalogueItem
from app.services.billing.payloads import Invoice, Subscription
from app.services.billing.rules import (
    Offer,
    StoredSubscription,
    SubscriptionState,
    UnknownPrice,
    find_offer,
    pack_sold,
    plan_lines,
    subscription_state,
    why_not_applied,
)
from tests.fake_stripe import PACK, PLAN
from tests.stripe_payloads import invoice, subscription

PRO = CatalogueItem(name="Pro monthly", credits=2000)
STARTER = CatalogueItem(name="Starter pack", credits=500)
CATALOGUE = Catalogue(packs={PACK: STARTER}, plans={PLAN: PRO})
USER = uuid.uuid4()


def with_lines(*lines: dict[str, Any]) -> Invoice:
    data = invoice("in_test", USER)
    template = data["lines"]["data"][0]
    data["lines"]["data"] = [{**template, **line} for line in lines]
    return Invoice.model_validate(data)


def test_a_lines_quantity_multiplies_its_plans_credits() -> None:
    lines = plan_lines(CATALOGUE, with_lines({"quantity": 3}))
    assert lines == [(PRO, 3)]
    assert sum(plan.credits * quantity for plan, quantity in lines) == 6000


@pytest.mark.parametrize("quantity", [None, 0, -2])
def test_a_missing_or_nonsensical_quantity_counts_once(quantity: int | None) -> None:
    assert plan_lines(CATALOGUE, with_lines({"quantity": quantity})) == [(PRO, 1)]


def test_prorations_one_off_items_and_unknown_prices_grant_nothing() -> None:
    proration = invoice("in_p", USER, proration=True)["lines"]["data"][0]
    one_off = {"parent": {"type": "invoice_item_details", "invoice_item_details": {"invoice_item": "ii_1"}}}
    unknown = invoice("in_u", USER, price="price_not_ours")["lines"]["data"][0]
    assert plan_lines(CATALOGUE, with_lines(proration, one_off, unknown)) == []


def test_several_plan_lines_each_grant() -> None:
    assert plan_lines(CATALOGUE, with_lines({"quantity": 1}, {"quantity": 2})) == [(PRO, 1), (PRO, 2)]


@pytest.mark.parametrize(
    "line",
    [
        {"type": "subscription", "proration": False, "quantity": 2, "price": {"id": PLAN, "object": "price"}},
        {"type": "subscription", "proration": False, "quantity": 2, "plan": {"id": PLAN, "object": "plan"}},
    ],
    ids=["price-at-top-level", "plan-only"],
)
def test_lines_in_the_shapes_of_older_api_versions(line: dict[str, Any]) -> None:
    legacy = Invoice.model_validate({"id": "in_old", "subscription": "sub_1", "lines": {"data": [line]}})
    assert legacy.subscription_id == "sub_1"
    assert plan_lines(CATALOGUE, legacy) == [(PRO, 2)]


def test_a_retired_plan_grants_what_its_checkout_sold() -> None:
    data = invoice("in_retired", USER, price="price_retired")
    data["parent"]["subscription_details"]["metadata"] = {"price_id": "price_retired", "credits": "750", "name": "Old"}
    assert plan_lines(CATALOGUE, Invoice.model_validate(data)) == [(CatalogueItem(name="Old", credits=750), 1)]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"price_id": PACK}, STARTER),
        ({"price_id": "price_gone", "credits": "300", "name": "Gone"}, CatalogueItem(name="Gone", credits=300)),
        ({"price_id": "price_gone", "credits": "lots"}, None),
        ({"price_id": "price_gone", "credits": "5000000"}, None),  # above what any price may grant
        ({}, None),
    ],
)
def test_what_a_pack_checkout_sold(metadata: dict[str, str], expected: CatalogueItem | None) -> None:
    assert pack_sold(CATALOGUE, metadata) == expected


def test_offers() -> None:
    assert find_offer(CATALOGUE, PACK) == Offer(PACK, STARTER, "payment")
    assert find_offer(CATALOGUE, PLAN) == Offer(PLAN, PRO, "subscription")
    with pytest.raises(UnknownPrice) as refused:
        find_offer(CATALOGUE, "price_nope")
    assert refused.value.status_code == 422


def at(second: int) -> datetime:
    return datetime.fromtimestamp(1_800_000_000 + second, UTC)


def state(status: str, subscription_id: str = "sub_1") -> SubscriptionState:
    return SubscriptionState(subscription_id, status, PLAN, None, None)


@pytest.mark.parametrize(
    ("stored", "new", "when", "refused"),
    [
        (StoredSubscription(None, None, None), state("active"), at(0), False),
        (StoredSubscription("sub_1", "active", at(10)), state("past_due"), at(5), True),  # older
        (StoredSubscription("sub_1", "active", at(10)), state("past_due"), at(11), False),
        # The same second: forward in a subscription's life (incomplete, active, ended) wins, never backward.
        (StoredSubscription("sub_1", "incomplete", at(10)), state("active"), at(10), False),
        (StoredSubscription("sub_1", "canceled", at(10)), state("active"), at(10), True),
        # Another subscription ending never hides a live one; a live one replaces an ended one.
        (StoredSubscription("sub_2", "active", at(10)), state("canceled"), at(20), True),
        (StoredSubscription("sub_2", "canceled", at(10)), state("active"), at(5), False),
    ],
)
def test_which_subscription_state_wins(
    stored: StoredSubscription, new: SubscriptionState, when: datetime, refused: bool
) -> None:
    assert (why_not_applied(stored, new, when) is not None) == refused


def test_subscription_state_reads_every_shape() -> None:
    current = Subscription.model_validate(subscription(USER, status="active", period_end=1_800_000_000))
    assert subscription_state(CATALOGUE, current, deleted=False) == SubscriptionState(
        "sub_test_pro", "active", PLAN, datetime.fromtimestamp(1_800_000_000, UTC), False
    )
    legacy = Subscription.model_validate(
        {"id": "sub_old", "status": "active", "current_period_end": 1_800_000_000, "cancel_at": 1_800_000_000}
    )
    old = subscription_state(CATALOGUE, legacy, deleted=False)
    assert (old.current_period_end, old.cancel_at_period_end) == (datetime.fromtimestamp(1_800_000_000, UTC), True)
    assert subscription_state(CATALOGUE, current, deleted=True).status == "canceled"
