"""Billing's pure rules, each on its own: what a price sells, which invoice lines grant, which subscription state
wins. The webhook tests cover them end to end; these pin the cases a refactor could break silently."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from app.config import Catalogue, CatalogueItem
from app.services.billing.payloads import Invoice, Subscription
from app.services.billing.rules import (
    Offer,
    SubscriptionState,
    UnknownPrice,
    find_offer,
    hides_live_subscription,
    plan_lines,
    share,
    sold_item,
    subscription_state,
)
from tests.fake_stripe import PACK, PLAN
from tests.stripe_payloads import invoice, subscription

PRO = CatalogueItem(name="Pro monthly", credits=2000)
STARTER = CatalogueItem(name="Starter pack", credits=500)
CATALOGUE = Catalogue(packs={PACK: STARTER}, plans={PLAN: PRO})


def with_lines(*lines: dict[str, Any]) -> Invoice:
    data = invoice("in_test", None)
    template = data["lines"]["data"][0]
    data["lines"]["data"] = [{**template, **line} for line in lines]
    return Invoice.model_validate(data)


def test_a_lines_quantity_multiplies_its_plans_credits() -> None:
    lines = plan_lines(CATALOGUE, with_lines({"quantity": 3}), None)
    assert lines == [(PRO, 3)]
    assert sum(plan.credits * quantity for plan, quantity in lines) == 6000


@pytest.mark.parametrize("quantity", [None, 0])
def test_a_missing_or_nonsensical_quantity_counts_once(quantity: int | None) -> None:
    assert plan_lines(CATALOGUE, with_lines({"quantity": quantity}), None) == [(PRO, 1)]


def test_prorations_one_off_items_and_unknown_prices_grant_nothing() -> None:
    proration = invoice("in_p", None, proration=True)["lines"]["data"][0]
    one_off = {"parent": {"type": "invoice_item_details", "invoice_item_details": {"invoice_item": "ii_1"}}}
    unknown = invoice("in_u", None, price="price_not_ours")["lines"]["data"][0]
    assert plan_lines(CATALOGUE, with_lines(proration, one_off, unknown), None) == []


def test_several_plan_lines_each_grant() -> None:
    assert plan_lines(CATALOGUE, with_lines({"quantity": 1}, {"quantity": 2}), None) == [(PRO, 1), (PRO, 2)]


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
    assert plan_lines(CATALOGUE, legacy, None) == [(PRO, 2)]


def test_a_recorded_checkout_grants_what_it_sold_for_its_price() -> None:
    """A checkout recorded what it sold (here more than today's catalogue says); a plan changed in the portal to
    another catalogue price grants that plan's credits; an unknown price grants nothing."""
    sold = (PLAN, CatalogueItem(name="Pro, as sold", credits=2500))
    other = invoice("in_x", None, price="price_pro_yearly")["lines"]["data"][0]
    unknown = invoice("in_y", None, price="price_unknown")["lines"]["data"][0]
    yearly = Catalogue(packs={}, plans={PLAN: PRO, "price_pro_yearly": CatalogueItem(name="Yearly", credits=30000)})
    assert plan_lines(yearly, with_lines({}, other, unknown), sold) == [
        (sold[1], 1),
        (CatalogueItem(name="Yearly", credits=30000), 1),
    ]


def test_subscriptions_from_before_recorded_checkouts_grant_what_their_metadata_sold() -> None:
    data = invoice("in_retired", None, price="price_retired")
    data["parent"]["subscription_details"]["metadata"] = {"price_id": "price_retired", "credits": "750", "name": "Old"}
    legacy = Invoice.model_validate(data)
    assert plan_lines(CATALOGUE, legacy, None) == [(CatalogueItem(name="Old", credits=750), 1)]
    # A recorded checkout's own record decides: metadata is not read.
    assert plan_lines(CATALOGUE, legacy, (PLAN, PRO)) == []


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"price_id": "price_gone", "credits": "300", "name": "Gone"}, CatalogueItem(name="Gone", credits=300)),
        ({"price_id": "price_gone", "credits": "lots"}, None),
        ({"price_id": "price_gone", "credits": "5000000"}, None),  # above what any price may grant
        ({"price_id": "price_other", "credits": "300"}, None),  # sold another price
        ({}, None),
    ],
)
def test_what_metadata_says_was_sold(metadata: dict[str, str], expected: CatalogueItem | None) -> None:
    assert sold_item(metadata, "price_gone") == expected


@pytest.mark.parametrize(
    ("credits", "part", "whole", "taken"),
    [
        (2000, 1000, 1000, 2000),
        (2000, 300, 1000, 600),
        (500, 1, 3, 167),
        (500, 1, 6, 83),
        (3, 1, 2, 2),
        (500, 0, 900, 0),
    ],
)
def test_the_share_of_a_grant_a_refund_or_dispute_takes(credits: int, part: int, whole: int, taken: int) -> None:
    assert share(credits, part, whole) == taken


def test_offers() -> None:
    assert find_offer(CATALOGUE, PACK) == Offer(PACK, STARTER, "payment")
    assert find_offer(CATALOGUE, PLAN) == Offer(PLAN, PRO, "subscription")
    with pytest.raises(UnknownPrice) as refused:
        find_offer(CATALOGUE, "price_nope")
    assert refused.value.status_code == 422


def state(status: str, subscription_id: str = "sub_1") -> SubscriptionState:
    return SubscriptionState(subscription_id, status, PLAN, None, False)


@pytest.mark.parametrize(
    ("stored_id", "stored_status", "new", "hidden"),
    [
        (None, None, state("canceled"), False),
        ("sub_1", "active", state("canceled"), False),  # the same subscription ending
        ("sub_2", "active", state("canceled"), True),  # another one ending never hides a live one
        ("sub_2", "canceled", state("active"), False),  # a live one replaces an ended one
        ("sub_2", "incomplete_expired", state("incomplete_expired"), False),
    ],
)
def test_an_ended_subscription_never_hides_a_live_one(
    stored_id: str | None, stored_status: str | None, new: SubscriptionState, hidden: bool
) -> None:
    assert hides_live_subscription(stored_id, stored_status, new) is hidden


def test_subscription_state_reads_every_shape() -> None:
    current = Subscription.model_validate(subscription(None, status="trialing", period_end=1_800_000_000))
    assert subscription_state(CATALOGUE, current) == SubscriptionState(
        "sub_test_pro", "trialing", PLAN, datetime.fromtimestamp(1_800_000_000, UTC), False
    )
    legacy = Subscription.model_validate(
        {"id": "sub_old", "status": "active", "current_period_end": 1_800_000_000, "cancel_at": 1_800_000_000}
    )
    old = subscription_state(CATALOGUE, legacy)
    assert (old.current_period_end, old.cancel_at_period_end) == (datetime.fromtimestamp(1_800_000_000, UTC), True)
