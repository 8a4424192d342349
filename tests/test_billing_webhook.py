"""Billing: Stripe's webhook, with events signed as Stripe signs them: exactly once, in any order."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.fake_stripe import HUGE_PACK, PLAN
from tests.stripe_payloads import (
    assert_ledger_consistent,
    checkout_session,
    deliver,
    event,
    grants,
    invoice,
    profile_row,
    signed,
    stripe_events,
    subscription,
)

# stripe-python hands httpx its form body as `data=`, which httpx deprecates; not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


# --- Webhook: verification --------------------------------------------------------------------------------------


async def test_webhook_without_a_secret_is_503(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    response = await client.post("/webhook", **signed(event("invoice.paid", {}, int(time.time()))))
    assert response.status_code == 503
    assert "STRIPE_WEBHOOK_SECRET" in response.json()["detail"]
    assert await stripe_events(engine) == []


async def test_webhook_refuses_what_stripe_did_not_sign(
    billing: httpx.AsyncClient, engine: AsyncEngine, user_id: uuid.UUID
) -> None:
    payload = event("checkout.session.completed", checkout_session(user_id), int(time.time()))
    good = signed(payload)

    missing = await billing.post("/webhook", content=good["content"])
    assert missing.status_code == 400
    assert missing.json()["detail"] == "missing Stripe-Signature header"

    wrong_secret = await billing.post("/webhook", **signed(payload, secret="whsec_someone_else"))
    assert wrong_secret.status_code == 400
    assert "invalid Stripe signature" in wrong_secret.json()["detail"]

    tampered = json.loads(good["content"])
    tampered["data"]["object"]["metadata"]["price_id"] = HUGE_PACK
    changed = await billing.post("/webhook", content=json.dumps(tampered).encode(), headers=good["headers"])
    assert changed.status_code == 400

    garbage = await billing.post("/webhook", content=good["content"], headers={"Stripe-Signature": "t=abc,v1=zz"})
    assert garbage.status_code == 400

    stale = await billing.post("/webhook", **signed(payload, timestamp=int(time.time()) - 400))
    assert stale.status_code == 400
    assert "too old" in stale.json()["detail"]

    assert await stripe_events(engine) == []
    assert (await billing.post("/webhook", **good)).status_code == 200  # the genuine one is accepted


async def test_webhook_refuses_signatures_from_the_future(
    billing: httpx.AsyncClient, engine: AsyncEngine, user_id: uuid.UUID
) -> None:
    """Signed with the secret for a time to come (a leaked secret, or a delivery held back): refused beyond the
    tolerance, as old ones are, so it cannot be replayed until then."""
    payload = event("checkout.session.completed", checkout_session(user_id), int(time.time()))
    for ahead in (400, 10 * 365 * 86400):
        future = await billing.post("/webhook", **signed(payload, timestamp=int(time.time()) + ahead))
        assert future.status_code == 400
        assert future.json()["detail"] == "Stripe signature timestamp is in the future: check this server's clock"
    assert await stripe_events(engine) == []
    # Clocks differ a little: a minute ahead is within the tolerance.
    assert (await billing.post("/webhook", **signed(payload, timestamp=int(time.time()) + 60))).status_code == 200


# --- Webhook: credit packs --------------------------------------------------------------------------------------


async def test_pack_purchase_is_granted_once(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    payload = event("checkout.session.completed", checkout_session(user_id), int(time.time()))
    first = await deliver(billing, payload)
    assert first.status_code == 200
    assert first.json() == {"received": True, "duplicate": False, "outcome": "granted 500 credits"}
    second = await deliver(billing, payload)
    assert second.json() == {"received": True, "duplicate": True, "outcome": "duplicate: already processed"}

    profile = (await billing.get("/profile", headers=auth)).json()
    assert profile["credits"] == 1000 + 500  # the profile was created by the event, with its signup grant
    assert profile["stripe_customer_id"] == "cus_test_buyer"
    assert await grants(engine, user_id) == [("purchase", 500, "cs_test_pack")]
    assert await stripe_events(engine) == [(payload["id"], "checkout.session.completed")]
    await assert_ledger_consistent(engine)


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_delayed_payment_is_granted_once_when_it_succeeds(
    billing: httpx.AsyncClient, engine: AsyncEngine, user_id: uuid.UUID, reverse: bool
) -> None:
    now = int(time.time())
    events = [
        event("checkout.session.completed", checkout_session(user_id, payment_status="unpaid"), now),
        event("checkout.session.async_payment_succeeded", checkout_session(user_id), now + 60),
        # A second event reporting the same paid session must not grant it again.
        event("checkout.session.completed", checkout_session(user_id), now + 61),
    ]
    for payload in (events[::-1] if reverse else events) * 2:
        assert (await deliver(billing, payload)).status_code == 200
    assert await grants(engine, user_id) == [("purchase", 500, "cs_test_pack")]
    assert len(await stripe_events(engine)) == 3
    await assert_ledger_consistent(engine)


async def test_delayed_payment_failure_grants_nothing(
    billing: httpx.AsyncClient, engine: AsyncEngine, user_id: uuid.UUID
) -> None:
    now = int(time.time())
    unpaid = checkout_session(user_id, payment_status="unpaid")
    waiting = await deliver(billing, event("checkout.session.completed", unpaid, now))
    assert waiting.json()["outcome"].startswith("waiting")
    failed = await deliver(billing, event("checkout.session.async_payment_failed", unpaid, now + 60))
    assert failed.status_code == 200
    assert failed.json()["outcome"] == "payment failed: no credits granted"
    assert await grants(engine, user_id) == []
    assert [kind for _, kind in await stripe_events(engine)] == [
        "checkout.session.completed",
        "checkout.session.async_payment_failed",
    ]


# --- Webhook: subscriptions -------------------------------------------------------------------------------------


def subscription_history(user_id: uuid.UUID, start: int) -> list[dict[str, Any]]:
    """A subscription's life as Stripe reports it: bought, paid, renewed, a failed payment, cancelled, ended."""
    first_end, second_end = start + 30 * 86400, start + 60 * 86400
    return [
        event("customer.subscription.created", subscription(user_id, status="incomplete", period_end=first_end), start),
        event(
            "checkout.session.completed",
            checkout_session(
                user_id, price=PLAN, mode="subscription", session_id="cs_test_sub", subscription="sub_test_pro"
            ),
            start + 1,
        ),
        event("invoice.paid", invoice("in_test_first", user_id), start + 2),
        event("customer.subscription.updated", subscription(user_id, status="active", period_end=first_end), start + 3),
        event("invoice.paid", invoice("in_test_second", user_id), start + 10),
        event(
            "customer.subscription.updated", subscription(user_id, status="active", period_end=second_end), start + 11
        ),
        event("invoice.payment_failed", invoice("in_test_third", user_id), start + 20),
        event(
            "customer.subscription.updated",
            subscription(user_id, status="past_due", period_end=second_end, cancel_at_period_end=True),
            start + 21,
        ),
        event(
            "customer.subscription.deleted", subscription(user_id, status="canceled", period_end=second_end), start + 30
        ),
    ]


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_subscription_events_twice_and_out_of_order(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], user_id: uuid.UUID, reverse: bool
) -> None:
    start = int(time.time()) - 3600
    history = subscription_history(user_id, start)
    deliveries = history[::-1] if reverse else history
    for payload in deliveries:
        for _ in range(2):  # every event arrives twice
            assert (await deliver(billing, payload)).status_code == 200

    # Each paid invoice granted the plan's credits once; the newest event decided the state.
    assert sorted(await grants(engine, user_id)) == [
        ("subscription_grant", 2000, "in_test_first"),
        ("subscription_grant", 2000, "in_test_second"),
    ]
    profile = (await billing.get("/profile", headers=auth)).json()
    assert profile["credits"] == 1000 + 2 * 2000
    assert profile["subscription_status"] == "canceled"
    assert profile["subscription_price_id"] == PLAN
    assert profile["subscription_cancel_at_period_end"] is False
    assert profile["stripe_customer_id"] == "cus_test_buyer"
    row = await profile_row(engine, user_id)
    assert row.subscription_id == "sub_test_pro"
    assert int(row.subscription_current_period_end.timestamp()) == start + 60 * 86400
    assert int(row.subscription_event_at.timestamp()) == start + 30
    assert len(await stripe_events(engine)) == len(history)
    await assert_ledger_consistent(engine)


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_newest_subscription_state_wins(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], user_id: uuid.UUID, reverse: bool
) -> None:
    start = int(time.time()) - 3600
    history = subscription_history(user_id, start)[:8]  # up to the cancellation request, before the end
    for payload in history[::-1] if reverse else history:
        assert (await deliver(billing, payload)).status_code == 200
    profile = (await billing.get("/profile", headers=auth)).json()
    assert profile["subscription_status"] == "past_due"
    assert profile["subscription_cancel_at_period_end"] is True
    assert profile["subscription_current_period_end"].startswith(
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + 60 * 86400))
    )


async def test_payment_failure_marks_the_subscription_past_due(
    billing: httpx.AsyncClient, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    start = int(time.time()) - 3600
    active = subscription(user_id, status="active", period_end=start + 86400)
    await deliver(billing, event("customer.subscription.updated", active, start))
    failed = await deliver(billing, event("invoice.payment_failed", invoice("in_test_failed", user_id), start + 5))
    assert failed.json()["outcome"] == "subscription sub_test_pro is past_due"
    profile = (await billing.get("/profile", headers=auth)).json()
    assert profile["subscription_status"] == "past_due"
    assert profile["subscription_price_id"] == PLAN  # what the failure does not say stays
    assert profile["credits"] == 1000


async def test_same_second_events_settle_forward(
    billing: httpx.AsyncClient, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    """Stripe stamps events in whole seconds: created (incomplete) and updated (active) often share one."""
    at = int(time.time()) - 60
    created = event("customer.subscription.created", subscription(user_id, status="incomplete", period_end=at), at)
    updated = event("customer.subscription.updated", subscription(user_id, status="active", period_end=at), at)
    for payload in (updated, created):
        assert (await deliver(billing, payload)).status_code == 200
    assert (await billing.get("/profile", headers=auth)).json()["subscription_status"] == "active"


async def test_an_older_subscription_ending_does_not_hide_the_live_one(
    billing: httpx.AsyncClient, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    at = int(time.time()) - 60
    new = subscription(user_id, status="active", period_end=at + 86400, subscription_id="sub_test_new")
    old = subscription(user_id, status="canceled", period_end=at, subscription_id="sub_test_old")
    await deliver(billing, event("customer.subscription.created", new, at))
    ended = await deliver(billing, event("customer.subscription.deleted", old, at + 5))
    assert ended.json()["outcome"] == "ignored: subscription sub_test_new is live"
    profile = (await billing.get("/profile", headers=auth)).json()
    assert profile["subscription_status"] == "active"


async def test_invoice_finds_the_user_by_customer(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    assert (await billing.post("/billing/checkout", headers=auth, json={"price_id": PLAN})).status_code == 200
    customer = (await billing.get("/profile", headers=auth)).json()["stripe_customer_id"]
    paid = invoice("in_test_by_customer", None, customer=customer)  # no user id in the metadata
    response = await deliver(billing, event("invoice.paid", paid, int(time.time())))
    assert response.json()["outcome"] == "granted 2000 credits"
    assert await grants(engine, user_id) == [("subscription_grant", 2000, "in_test_by_customer")]


async def test_invoice_in_the_shape_of_older_api_versions(
    billing: httpx.AsyncClient, engine: AsyncEngine, user_id: uuid.UUID
) -> None:
    """An endpoint pinned to an API version before 2025-03-31 sends the subscription and price at the top level."""
    legacy = {
        "id": "in_test_legacy",
        "object": "invoice",
        "customer": "cus_test_buyer",
        "subscription": "sub_test_pro",
        "subscription_details": {"metadata": {"user_id": str(user_id)}},
        "lines": {
            "data": [
                {
                    "id": "il_legacy",
                    "type": "subscription",
                    "proration": False,
                    "quantity": 1,
                    "price": {"id": PLAN, "object": "price"},
                }
            ]
        },
    }
    response = await deliver(billing, event("invoice.paid", legacy, int(time.time())))
    assert response.json()["outcome"] == "granted 2000 credits"
    assert await grants(engine, user_id) == [("subscription_grant", 2000, "in_test_legacy")]


async def test_prorations_and_unknown_prices_grant_nothing(
    billing: httpx.AsyncClient, engine: AsyncEngine, user_id: uuid.UUID
) -> None:
    now = int(time.time())
    prorated = await deliver(billing, event("invoice.paid", invoice("in_test_proration", user_id, proration=True), now))
    other = await deliver(billing, event("invoice.paid", invoice("in_test_other", user_id, price="price_other"), now))
    for response in (prorated, other):
        assert response.status_code == 200
        assert response.json()["outcome"] == "ignored: no SUBSCRIPTION_PLANS price on this invoice"
    assert await grants(engine, user_id) == []


# --- Webhook: what we acknowledge without acting, and our own failures ------------------------------------------


async def test_unknown_users_and_unhandled_types_are_acknowledged(
    billing: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    now = int(time.time())
    stranger = invoice("in_test_stranger", None, customer="cus_test_unknown")
    response = await deliver(billing, event("invoice.paid", stranger, now))
    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored: no user found for this invoice"
    unhandled = await deliver(billing, event("customer.created", {"id": "cus_test_new", "object": "customer"}, now))
    assert unhandled.status_code == 200
    assert unhandled.json()["outcome"] == "ignored: event type not handled"
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM profiles")) == 0
        outcomes = set(await connection.scalars(text("SELECT outcome FROM stripe_events")))
    assert outcomes == {"ignored: no user found for this invoice", "ignored: event type not handled"}


async def test_our_own_failure_is_5xx_and_records_nothing(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    """A grant the database refuses (the balance would overflow) fails the request, so Stripe retries it."""
    nearly_full = 2_147_000_000
    async with engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO profiles (id, credits) VALUES (:id, :credits)"), {"id": user_id, "credits": nearly_full}
        )
        await connection.execute(
            text(
                "INSERT INTO credit_entries (profile_id, amount, balance_after, kind) "
                "VALUES (:id, :credits, :credits, 'adjustment')"
            ),
            {"id": user_id, "credits": nearly_full},
        )
    payload = event("checkout.session.completed", checkout_session(user_id, price=HUGE_PACK), int(time.time()))
    response = await deliver(billing, payload)
    assert response.status_code == 500
    assert await stripe_events(engine) == []  # not recorded: the retry will be processed
    assert (await billing.get("/profile", headers=auth)).json()["credits"] == nearly_full  # nothing half-written
    await assert_ledger_consistent(engine)
