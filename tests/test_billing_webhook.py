"""Billing: Stripe's webhook, with events signed as Stripe signs them: grants exactly once, only for what this
service sold, and a recorded outcome for whatever cannot be applied."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.fake_stripe import HUGE_PACK, PACK, PLAN, FakeStripe
from tests.stripe_payloads import (
    Purchase,
    assert_ledger_consistent,
    completed,
    deliver,
    event,
    grants,
    outcomes,
    paid_invoice,
    purchase,
    signed,
    stripe_events,
    subscription,
)

# stripe-python hands httpx its form body as `data=`, which httpx deprecates; not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
async def pack(billing: httpx.AsyncClient, fake_stripe: FakeStripe, auth: dict[str, str]) -> Purchase:
    """A pack checkout the user started (their profile has 1000 credits)."""
    return await purchase(billing, fake_stripe, auth, PACK)


@pytest.fixture
async def plan(billing: httpx.AsyncClient, fake_stripe: FakeStripe, auth: dict[str, str]) -> Purchase:
    """A subscription checkout the user started; Stripe holds its subscription, active."""
    bought = await purchase(billing, fake_stripe, auth, PLAN)
    fake_stripe.holds(subscription(bought, status="active", period_end=int(time.time()) + 30 * 86400))
    return bought


async def credits_of(billing: httpx.AsyncClient, headers: dict[str, str]) -> int:
    return int((await billing.get("/profile", headers=headers)).json()["credits"])


# --- Verification ------------------------------------------------------------------------------------------------


async def test_webhook_without_a_secret_is_503(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    response = await client.post("/webhook", **signed(event("invoice.paid", {})))
    assert response.status_code == 503
    assert "STRIPE_WEBHOOK_SECRET" in response.json()["detail"]
    assert await stripe_events(engine) == []


async def test_webhook_refuses_what_stripe_did_not_sign(
    billing: httpx.AsyncClient, engine: AsyncEngine, fake_stripe: FakeStripe, pack: Purchase
) -> None:
    payload = event("checkout.session.completed", completed(fake_stripe, pack))
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
    billing: httpx.AsyncClient, engine: AsyncEngine, fake_stripe: FakeStripe, pack: Purchase
) -> None:
    """Signed with the secret for a time to come (a leaked secret, or a delivery held back): refused beyond the
    tolerance, as old ones are, so it cannot be replayed until then."""
    payload = event("checkout.session.completed", completed(fake_stripe, pack))
    for ahead in (400, 10 * 365 * 86400):
        future = await billing.post("/webhook", **signed(payload, timestamp=int(time.time()) + ahead))
        assert future.status_code == 400
        assert future.json()["detail"] == "Stripe signature timestamp is in the future: check this server's clock"
    assert await stripe_events(engine) == []
    # Clocks differ a little: a minute ahead is within the tolerance.
    assert (await billing.post("/webhook", **signed(payload, timestamp=int(time.time()) + 60))).status_code == 200


# --- Credit packs ------------------------------------------------------------------------------------------------


async def test_a_pack_is_granted_once_with_the_payment_behind_it(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], fake_stripe: FakeStripe, pack: Purchase
) -> None:
    payload = event("checkout.session.completed", completed(fake_stripe, pack, payment_intent="pi_pack"))
    first = await deliver(billing, payload)
    assert first.status_code == 200
    assert first.json() == {"received": True, "duplicate": False, "outcome": "granted 500 credits"}
    second = await deliver(billing, payload)
    assert second.json() == {"received": True, "duplicate": True, "outcome": "duplicate: already processed"}

    profile = (await billing.get("/profile", headers=auth)).json()
    assert profile["credits"] == 1000 + 500
    assert profile["stripe_customer_id"] == pack.customer
    assert await grants(engine, pack.user_id) == [("purchase", 500, pack.session_id)]
    async with engine.connect() as connection:
        payment = (await connection.execute(text("SELECT * FROM stripe_payments"))).one()
        concerned = await connection.scalar(text("SELECT profile_id FROM stripe_events"))
    assert (payment.id, payment.grant_reference, payment.credits_granted, payment.amount_paid) == (
        "pi_pack",
        pack.session_id,
        500,
        900,
    )
    assert concerned == pack.user_id
    await assert_ledger_consistent(engine)


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_delayed_payment_is_granted_once_when_it_succeeds(
    billing: httpx.AsyncClient, engine: AsyncEngine, fake_stripe: FakeStripe, pack: Purchase, reverse: bool
) -> None:
    now = int(time.time())
    unpaid = completed(fake_stripe, pack, payment_status="unpaid")
    paid = completed(fake_stripe, pack)
    events = [
        event("checkout.session.completed", unpaid, now),
        event("checkout.session.async_payment_succeeded", paid, now + 60),
        # A second event reporting the same paid session must not grant it again.
        event("checkout.session.completed", paid, now + 61),
    ]
    for payload in (events[::-1] if reverse else events) * 2:
        assert (await deliver(billing, payload)).status_code == 200
    assert await grants(engine, pack.user_id) == [("purchase", 500, pack.session_id)]
    assert len(await stripe_events(engine)) == 3
    await assert_ledger_consistent(engine)


async def test_delayed_payment_failure_grants_nothing(
    billing: httpx.AsyncClient, engine: AsyncEngine, fake_stripe: FakeStripe, pack: Purchase
) -> None:
    unpaid = completed(fake_stripe, pack, payment_status="unpaid")
    waiting = await deliver(billing, event("checkout.session.completed", unpaid))
    assert waiting.json()["outcome"].startswith("waiting")
    failed = await deliver(billing, event("checkout.session.async_payment_failed", unpaid))
    assert failed.json()["outcome"] == "payment failed: no credits granted"
    assert await grants(engine, pack.user_id) == []


async def test_a_checkout_this_service_did_not_create_grants_nothing(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    """Signed with our secret, but made elsewhere on the same Stripe account: its metadata names our biggest pack
    and our user, and it cost 1 cent. Credits come only from checkouts this service recorded."""
    assert (await billing.post("/profile", headers=auth)).status_code == 201
    forged = {
        "id": "cs_test_elsewhere",
        "object": "checkout.session",
        "mode": "payment",
        "payment_status": "paid",
        "amount_total": 1,
        "customer": "cus_test_elsewhere",
        "client_reference_id": str(user_id),
        "metadata": {"user_id": str(user_id), "price_id": HUGE_PACK, "credits": "1000000", "name": "Agency pack"},
    }
    response = await deliver(billing, event("checkout.session.completed", forged))
    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored: checkout session cs_test_elsewhere was not created by this service"
    assert await credits_of(billing, auth) == 1000


# --- Subscription invoices ---------------------------------------------------------------------------------------


async def test_each_paid_invoice_grants_the_plan_once(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], fake_stripe: FakeStripe, plan: Purchase
) -> None:
    first = paid_invoice(fake_stripe, "in_test_first", plan, payment_intent="pi_first")
    paid = await deliver(billing, event("invoice.paid", first))
    assert paid.json()["outcome"] == "granted 2000 credits; subscription sub_test_pro is active"
    # Stripe sends both for one payment; an endpoint may subscribe to either.
    succeeded = await deliver(billing, event("invoice.payment_succeeded", first))
    assert succeeded.json()["outcome"].startswith("already granted")
    renewal = paid_invoice(fake_stripe, "in_test_second", plan)
    assert (
        (await deliver(billing, event("invoice.payment_succeeded", renewal)))
        .json()["outcome"]
        .startswith("granted 2000 credits")
    )
    assert await grants(engine, plan.user_id) == [
        ("subscription_grant", 2000, "in_test_first"),
        ("subscription_grant", 2000, "in_test_second"),
    ]
    assert await credits_of(billing, auth) == 1000 + 4000
    async with engine.connect() as connection:
        payments = (await connection.execute(text("SELECT id, grant_reference FROM stripe_payments ORDER BY 1"))).all()
        bound = await connection.scalar(text("SELECT subscription_id FROM checkout_sessions"))
    assert [tuple(row) for row in payments] == [("pi_first", "in_test_first"), ("pi_in_test_second", "in_test_second")]
    assert bound == "sub_test_pro"
    await assert_ledger_consistent(engine)


async def test_a_lines_quantity_multiplies_its_plans_credits(
    billing: httpx.AsyncClient, engine: AsyncEngine, fake_stripe: FakeStripe, plan: Purchase
) -> None:
    seats = paid_invoice(fake_stripe, "in_test_seats", plan, quantity=3)
    assert (await deliver(billing, event("invoice.paid", seats))).json()["outcome"].startswith("granted 6000 credits")
    assert await grants(engine, plan.user_id) == [("subscription_grant", 6000, "in_test_seats")]


async def test_a_retired_plan_still_grants_what_was_sold(
    billing: httpx.AsyncClient,
    billing_app: FastAPI,
    engine: AsyncEngine,
    fake_stripe: FakeStripe,
    plan: Purchase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plan leaves the catalogue (a new deploy's settings); its renewals grant what its checkout sold."""
    monkeypatch.setitem(billing_app.state.resources.settings.__dict__, "subscription_plans", {})
    renewal = paid_invoice(fake_stripe, "in_test_retired", plan)
    assert (await deliver(billing, event("invoice.paid", renewal))).json()["outcome"].startswith("granted 2000")
    assert await grants(engine, plan.user_id) == [("subscription_grant", 2000, "in_test_retired")]


async def test_invoices_of_subscriptions_started_elsewhere_grant_nothing(
    billing: httpx.AsyncClient, engine: AsyncEngine, fake_stripe: FakeStripe, plan: Purchase
) -> None:
    stranger = paid_invoice(fake_stripe, "in_test_stranger", None, subscription_id="sub_test_other")
    ignored = await deliver(billing, event("invoice.paid", stranger))
    assert ignored.json()["outcome"] == "ignored: no user found for this invoice"
    # Our checkout's reference copied onto another subscription: the checkout started one subscription only.
    first = paid_invoice(fake_stripe, "in_test_first", plan)
    assert (await deliver(billing, event("invoice.paid", first))).json()["outcome"].startswith("granted")
    copied = paid_invoice(fake_stripe, "in_test_copied", plan, subscription_id="sub_test_copy")
    refused = await deliver(billing, event("invoice.paid", copied))
    assert refused.json()["outcome"] == (
        f"ignored: subscription sub_test_copy was not started by checkout {plan.session_id}"
    )
    assert await grants(engine, plan.user_id) == [("subscription_grant", 2000, "in_test_first")]


async def test_subscriptions_linked_before_checkouts_were_recorded_still_grant(
    billing: httpx.AsyncClient, engine: AsyncEngine, fake_stripe: FakeStripe, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    """A subscription bought before this version, linked to its profile then; its renewals arrive from an endpoint
    pinned to an API version before 2025-03-31 (subscription and price at the top level)."""
    assert (await billing.post("/profile", headers=auth)).status_code == 201
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE profiles SET subscription_id = 'sub_test_old', stripe_customer_id = 'cus_test_old'")
        )
    legacy = {
        "id": "in_test_legacy",
        "object": "invoice",
        "customer": "cus_test_old",
        "subscription": "sub_test_old",
        "subscription_details": {"metadata": {"user_id": str(user_id)}},
        "lines": {
            "data": [
                {
                    "id": "il_legacy",
                    "type": "subscription",
                    "proration": False,
                    "quantity": 1,
                    "plan": {"id": PLAN, "object": "plan"},
                }
            ]
        },
    }
    response = await deliver(billing, event("invoice.paid", legacy))
    assert response.json()["outcome"] == "granted 2000 credits"  # Stripe has no copy: nothing else to store
    assert await grants(engine, user_id) == [("subscription_grant", 2000, "in_test_legacy")]


async def test_prorations_and_unknown_prices_grant_nothing(
    billing: httpx.AsyncClient, engine: AsyncEngine, fake_stripe: FakeStripe, plan: Purchase
) -> None:
    prorated = paid_invoice(fake_stripe, "in_test_proration", plan, proration=True)
    other = paid_invoice(fake_stripe, "in_test_other", plan, price="price_other")
    for paid in (prorated, other):
        response = await deliver(billing, event("invoice.paid", paid))
        assert response.json()["outcome"] == "ignored: no SUBSCRIPTION_PLANS price on this invoice"
    assert await grants(engine, plan.user_id) == []


# --- What is acknowledged without acting, and what cannot be applied ----------------------------------------------


async def test_unknown_users_and_unhandled_types_are_acknowledged(
    billing: httpx.AsyncClient, engine: AsyncEngine, fake_stripe: FakeStripe
) -> None:
    stranger = paid_invoice(fake_stripe, "in_test_stranger", None, customer="cus_test_unknown")
    response = await deliver(billing, event("invoice.paid", stranger))
    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored: no user found for this invoice"
    unhandled = await deliver(billing, event("customer.created", {"id": "cus_test_new", "object": "customer"}))
    assert unhandled.status_code == 200
    assert unhandled.json()["outcome"] == "ignored: event type not handled"
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM profiles")) == 0
    assert sorted(await outcomes(engine)) == [
        "ignored: event type not handled",
        "ignored: no user found for this invoice",
    ]


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        ("checkout.session.completed", {"created": "yesterday"}),
        ("checkout.session.completed", {"created": 1e20}),
        ("checkout.session.completed", {"data": {"object": {"object": "checkout.session", "mode": "payment"}}}),
        (
            "customer.subscription.updated",
            {"data": {"object": {"id": "sub_x", "object": "subscription", "current_period_end": 10**15}}},
        ),
        (
            "invoice.paid",
            {"data": {"object": {"id": "in_x", "object": "invoice", "lines": {"data": [{"quantity": "x"}]}}}},
        ),
    ],
    ids=["created-text", "created-1e20", "session-without-id", "period-end-1e15", "quantity-text"],
)
async def test_signed_but_odd_payloads_are_recorded_as_rejected_once(
    billing: httpx.AsyncClient, engine: AsyncEngine, kind: str, change: dict[str, Any]
) -> None:
    """Stripe would retry a 5xx for three days, failing the same way each time: such an event is answered 200,
    recorded as rejected (and logged as an error), and a redelivery is a duplicate."""
    payload = {**event(kind, {}), **change}
    first = await deliver(billing, payload)
    assert first.status_code == 200
    assert first.json()["outcome"].startswith("rejected: ")
    again = await deliver(billing, payload)
    assert again.json()["duplicate"] is True
    assert await stripe_events(engine) == [(payload["id"], kind)]


async def test_a_grant_beyond_any_balance_is_recorded_once_not_retried(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], fake_stripe: FakeStripe
) -> None:
    """A grant the database cannot apply (the balance would pass 2**63) would fail the same way on every retry for
    three days: it is recorded as rejected, nothing is half-written, and it is answered 200."""
    huge = await purchase(billing, fake_stripe, auth, HUGE_PACK)
    nearly_full = 2**63 - 1000
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE profiles SET credits = :credits WHERE id = :id"), {"id": huge.user_id, "credits": nearly_full}
        )
        await connection.execute(
            text(
                "INSERT INTO credit_entries (profile_id, amount, balance_after, kind) "
                "VALUES (:id, :amount, :credits, 'adjustment')"
            ),
            {"id": huge.user_id, "amount": nearly_full - 1000, "credits": nearly_full},
        )
    payload = event("checkout.session.completed", completed(fake_stripe, huge))
    response = await deliver(billing, payload)
    assert response.status_code == 200
    assert response.json()["outcome"] == "rejected: its amounts are beyond what a balance can hold"
    assert await stripe_events(engine) == [(payload["id"], "checkout.session.completed")]
    assert await credits_of(billing, auth) == nearly_full  # nothing half-written
    await assert_ledger_consistent(engine)


async def test_an_invoice_for_an_absurd_quantity_is_recorded_not_retried(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], fake_stripe: FakeStripe, plan: Purchase
) -> None:
    absurd = paid_invoice(fake_stripe, "in_test_absurd", plan, quantity=2**61)
    response = await deliver(billing, event("invoice.paid", absurd))
    assert response.status_code == 200
    assert response.json()["outcome"].startswith("rejected: ")
    assert await credits_of(billing, auth) == 1000
    await assert_ledger_consistent(engine)


async def test_our_own_failure_is_5xx_and_records_nothing(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], fake_stripe: FakeStripe, pack: Purchase
) -> None:
    """When applying fails on our side (here the ledger's table is missing), the answer is 5xx and nothing is
    recorded, so Stripe's retry is processed normally once the fault is gone."""
    payload = event("checkout.session.completed", completed(fake_stripe, pack))
    async with engine.begin() as connection:
        await connection.execute(text("ALTER TABLE credit_entries RENAME TO credit_entries_away"))
    try:
        response = await deliver(billing, payload)
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("ALTER TABLE credit_entries_away RENAME TO credit_entries"))
    assert response.status_code == 500
    assert await stripe_events(engine) == []  # not recorded: the retry will be processed
    assert await credits_of(billing, auth) == 1000  # nothing half-written
    retried = await deliver(billing, payload)
    assert retried.json()["outcome"] == "granted 500 credits"
    await assert_ledger_consistent(engine)
