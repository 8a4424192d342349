"""Billing: the catalogue, Checkout and the portal, against a local fake of Stripe's API."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from app.application import create_app
from app.config import load_settings
from tests.conftest import TokenFactory, bearer, make_settings
from tests.fake_stripe import CATALOGUE, FRONTEND, PACK, PLAN, SECRET_KEY, FakeStripe
from tests.stripe_payloads import (
    assert_ledger_consistent,
    deliver,
    event,
    grants,
    invoice,
)

# stripe-python hands httpx its form body as `data=`, which httpx deprecates; not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


# --- Catalogue ----------------------------------------------------------------------------------------------


async def test_plans_lists_the_catalogue(billing: httpx.AsyncClient) -> None:
    response = await billing.get("/billing/plans")
    assert response.status_code == 200
    body = response.json()
    assert body["publishable_key"] == "pk_test_picads"
    assert body["checkout_enabled"] is True
    assert {"price_id": PACK, "name": "Starter pack", "credits": 500} in body["credit_packs"]
    assert body["subscription_plans"] == [{"price_id": PLAN, "name": "Pro monthly", "credits": 2000}]


async def test_plans_without_stripe(client: httpx.AsyncClient) -> None:
    body = (await client.get("/billing/plans")).json()
    assert body == {"publishable_key": None, "checkout_enabled": False, "credit_packs": [], "subscription_plans": []}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"credit_packs": "{not json"}, "CREDIT_PACKS: must be a JSON object"),
        ({"credit_packs": '{"prod_123": {"name": "x", "credits": 5}}'}, "that is a product id"),
        (
            {"credit_packs": '{"price_1": {"name": "x", "credits": 0}}'},
            "CREDIT_PACKS: price_1: credits: Input should be greater than 0",
        ),
        ({"subscription_plans": '{"price_1": {"name": "", "credits": 5}}'}, "SUBSCRIPTION_PLANS: price_1: name"),
        (
            {"credit_packs": '{"price_1": {"name": "x", "credit": 5}}'},
            "CREDIT_PACKS: price_1: credit: Extra inputs are not permitted",
        ),
        (
            {
                "credit_packs": '{"price_1": {"name": "a", "credits": 5}}',
                "subscription_plans": '{"price_1": {"name": "b", "credits": 5}}',
            },
            "price_1 is in both CREDIT_PACKS and SUBSCRIPTION_PLANS",
        ),
        ({"stripe_secret_key": "pk_test_123"}, "STRIPE_SECRET_KEY: this is a publishable key"),
        ({"stripe_webhook_secret": "sk_test_123"}, "STRIPE_WEBHOOK_SECRET: must be a webhook signing secret"),
    ],
    ids=[
        "bad-json",
        "product-id",
        "zero-credits",
        "empty-name",
        "typo",
        "in-both",
        "publishable-as-secret",
        "not-whsec",
    ],
)
def test_bad_billing_settings_stop_start_up(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        load_settings(_env_file=None, environment="test", **overrides)
    assert message in str(stopped.value)


def test_catalogue_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDIT_PACKS", '{"price_a": {"name": "Pack", "credits": 100}}')
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "")
    settings = load_settings(_env_file=None, environment="test")
    assert settings.credit_packs["price_a"].credits == 100
    assert settings.subscription_plans == {}
    assert settings.stripe_webhook_secret is None


# --- Checkout and the portal ------------------------------------------------------------------------------------


async def test_checkout_for_a_pack(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, engine: AsyncEngine, token: TokenFactory, user_id: uuid.UUID
) -> None:
    auth = bearer(token(user_id, email="ada@example.com"))
    response = await billing.post("/billing/checkout", headers=auth, json={"price_id": PACK})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["session_id"].startswith("cs_test_")
    assert body["url"] == f"https://checkout.stripe.com/c/pay/{body['session_id']}"

    customer, checkout = fake_stripe.requests
    assert customer.path == "/v1/customers"
    assert customer.form == {"email": "ada@example.com", "metadata[user_id]": str(user_id)}
    assert customer.headers["idempotency-key"] == f"customer-{user_id}"
    assert customer.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert customer.headers["stripe-version"] == stripe.api_version
    assert checkout.path == "/v1/checkout/sessions"
    reference = checkout.form["metadata[checkout_reference]"]
    assert checkout.form == {
        "mode": "payment",
        "customer": "cus_test_0",
        "line_items[0][price]": PACK,
        "line_items[0][quantity]": "1",
        "client_reference_id": str(user_id),
        "metadata[checkout_reference]": reference,
        "metadata[user_id]": str(user_id),
        "metadata[price_id]": PACK,
        "metadata[credits]": "500",
        "metadata[name]": "Starter pack",
        "success_url": f"{FRONTEND}/billing/success?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{FRONTEND}/billing/cancel",
    }

    # Recorded with what it sold: the webhook grants for this session only, and this.
    async with engine.connect() as connection:
        recorded = (await connection.execute(text("SELECT * FROM checkout_sessions"))).one()
    assert (recorded.id, recorded.profile_id, str(recorded.reference)) == (body["session_id"], user_id, reference)
    assert (recorded.price_id, recorded.name, recorded.credits, recorded.mode) == (PACK, "Starter pack", 500, "payment")

    # The profile now exists with its customer; the next checkout reuses it.
    profile = (await billing.get("/profile", headers=auth)).json()
    assert profile["stripe_customer_id"] == "cus_test_0"
    assert profile["credits"] == 1000  # nothing granted until Stripe says the payment succeeded
    again = await billing.post("/billing/checkout", headers=auth, json={"price_id": PACK})
    assert again.status_code == 200
    assert [r.path for r in fake_stripe.requests] == ["/v1/customers", "/v1/checkout/sessions", "/v1/checkout/sessions"]
    assert fake_stripe.requests[-1].form["customer"] == "cus_test_0"


async def test_checkout_for_a_subscription(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, token: TokenFactory, user_id: uuid.UUID
) -> None:
    auth = bearer(token(user_id, email=None))  # phone users have no email: the customer is made without one
    response = await billing.post("/billing/checkout", headers=auth, json={"price_id": PLAN})
    assert response.status_code == 200, response.text
    customer, checkout = fake_stripe.requests
    assert "email" not in customer.form
    assert checkout.form["mode"] == "subscription"
    assert checkout.form["line_items[0][price]"] == PLAN
    assert checkout.form["subscription_data[metadata][user_id]"] == str(user_id)
    assert (
        checkout.form["subscription_data[metadata][checkout_reference]"]
        == checkout.form["metadata[checkout_reference]"]
    )
    assert checkout.form["subscription_data[metadata][price_id]"] == PLAN
    assert checkout.form["subscription_data[metadata][credits]"] == "2000"


async def test_a_second_live_subscription_is_refused(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, engine: AsyncEngine, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    assert (await billing.post("/billing/checkout", headers=auth, json={"price_id": PLAN})).status_code == 200
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE profiles SET subscription_id = 'sub_1', subscription_status = 'active' WHERE id = :id"),
            {"id": user_id},
        )
    sent = len(fake_stripe.requests)
    again = await billing.post("/billing/checkout", headers=auth, json={"price_id": PLAN})
    assert again.status_code == 409
    assert "/billing/portal" in again.json()["detail"]
    assert len(fake_stripe.requests) == sent  # Stripe was not asked
    assert (await billing.post("/billing/checkout", headers=auth, json={"price_id": PACK})).status_code == 200
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE profiles SET subscription_status = 'canceled' WHERE id = :id"), {"id": user_id}
        )
    assert (await billing.post("/billing/checkout", headers=auth, json={"price_id": PLAN})).status_code == 200


async def test_a_retired_price_of_a_subscription_from_before_recorded_checkouts_grants_what_was_sold(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    """A subscription bought before checkouts were recorded, on a price since taken out of the catalogue: its
    renewals grant what its metadata says was sold for that price, and nothing for another price."""
    assert (await billing.post("/profile", headers=auth)).status_code == 201
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE profiles SET subscription_id = 'sub_test_pro'"))
    sold = {"user_id": str(user_id), "price_id": "price_plan_legacy", "credits": "1500", "name": "Old"}
    retired_plan = invoice("in_test_retired", None, price="price_plan_legacy")
    retired_plan["parent"]["subscription_details"]["metadata"] = sold
    renewal = await deliver(billing, event("invoice.paid", retired_plan))
    assert renewal.json()["outcome"] == "granted 1500 credits"
    other_price = invoice("in_test_other_price", None, price="price_plan_unknown")
    other_price["parent"]["subscription_details"]["metadata"] = sold  # sold: price_plan_legacy, not this one
    ignored = await deliver(billing, event("invoice.paid", other_price))
    assert ignored.json()["outcome"].startswith("ignored")
    assert await grants(engine, user_id) == [("subscription_grant", 1500, "in_test_retired")]
    await assert_ledger_consistent(engine)


async def test_checkout_refuses_an_unknown_price(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, auth: dict[str, str]
) -> None:
    for body in ({"price_id": "price_not_for_sale"}, {"price_id": PACK, "credits": 10**6}, {}):
        response = await billing.post("/billing/checkout", headers=auth, json=body)
        assert response.status_code == 422, body
    assert (
        "GET /billing/plans"
        in (await billing.post("/billing/checkout", headers=auth, json={"price_id": "price_x"})).json()["detail"]
    )
    assert fake_stripe.requests == []


async def test_checkout_needs_a_user(billing: httpx.AsyncClient, fake_stripe: FakeStripe) -> None:
    assert (await billing.post("/billing/checkout", json={"price_id": PACK})).status_code == 401
    assert (await billing.post("/billing/portal")).status_code == 401
    assert fake_stripe.requests == []


async def test_stripe_error_is_502_and_leaves_nothing_behind(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    fake_stripe.failure = (400, {"error": {"type": "invalid_request_error", "message": f"No such price: '{PACK}'"}})
    fake_stripe.fail_path = "/v1/checkout/sessions"
    response = await billing.post("/billing/checkout", headers=auth, json={"price_id": PACK})
    assert response.status_code == 502
    assert response.json()["detail"] == (
        f"could not create the checkout session: Stripe refused the request: No such price: '{PACK}'; try again shortly"
    )
    # The profile and its Stripe customer are kept: nothing was charged or granted, and a retry reuses them.
    profile = (await billing.get("/profile", headers=auth)).json()
    assert (profile["credits"], profile["stripe_customer_id"]) == (1000, "cus_test_0")

    fake_stripe.failure = None
    assert (await billing.post("/billing/checkout", headers=auth, json={"price_id": PACK})).status_code == 200
    keys = [r.headers["idempotency-key"] for r in fake_stripe.requests if r.path == "/v1/customers"]
    assert keys == [f"customer-{user_id}"]


async def test_a_slow_stripe_does_not_hold_database_connections(
    database_url: URL,
    tmp_path: Path,
    app: FastAPI,
    fake_stripe: FakeStripe,
    token: TokenFactory,
) -> None:
    """With one pooled session connection, other session requests go on while checkouts wait for Stripe."""
    settings = make_settings(
        database_url,
        tmp_path,
        stripe_secret_key=SECRET_KEY,
        stripe_api_base=fake_stripe.url,
        stripe_max_network_retries=0,
        db_session_pool_size=1,
        db_pool_timeout=0.5,
        **CATALOGUE,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            buyers = [bearer(token()) for _ in range(3)]
            reader = bearer(token())
            assert (await http.post("/profile", headers=reader)).status_code == 201
            fake_stripe.delay = 1.0
            checkouts = [
                asyncio.create_task(http.post("/billing/checkout", headers=buyer, json={"price_id": PACK}))
                for buyer in buyers
            ]
            await asyncio.sleep(0.3)  # all three are now waiting on Stripe
            # POST /profile for an existing profile is a read through a session, like the checkouts.
            reads = [await http.post("/profile", headers=reader) for _ in range(3)]
            assert [read.status_code for read in reads] == [200, 200, 200]
            assert [(await checkout).status_code for checkout in checkouts] == [200, 200, 200]


async def test_a_failed_customer_creation_stores_nothing_and_is_retried_with_the_same_key(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    fake_stripe.failure = (500, {"error": {"type": "api_error", "message": "Something went wrong"}})
    fake_stripe.fail_path = "/v1/customers"
    assert (await billing.post("/billing/checkout", headers=auth, json={"price_id": PACK})).status_code == 502
    assert (await billing.get("/profile", headers=auth)).json()["stripe_customer_id"] is None
    fake_stripe.failure = None
    assert (await billing.post("/billing/checkout", headers=auth, json={"price_id": PACK})).status_code == 200
    keys = {r.headers["idempotency-key"] for r in fake_stripe.requests if r.path == "/v1/customers"}
    assert keys == {f"customer-{user_id}"}


@pytest.mark.parametrize(
    ("status", "error", "detail"),
    [
        (
            401,
            {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_****"},
            "check STRIPE_SECRET_KEY",
        ),
        (500, {"type": "api_error", "message": "Something went wrong"}, "Stripe failed"),
    ],
    ids=["bad-key", "stripe-down"],
)
async def test_stripe_failures_are_502(
    billing: httpx.AsyncClient,
    fake_stripe: FakeStripe,
    auth: dict[str, str],
    status: int,
    error: dict[str, Any],
    detail: str,
) -> None:
    fake_stripe.failure = (status, {"error": error})
    response = await billing.post("/billing/checkout", headers=auth, json={"price_id": PACK})
    assert response.status_code == 502
    assert detail in response.json()["detail"]
    assert "sk_test" not in response.text


async def test_unreachable_stripe_is_502(database_url: URL, tmp_path: Any, app: FastAPI, token: TokenFactory) -> None:
    settings = make_settings(
        database_url,
        tmp_path,
        stripe_secret_key=SECRET_KEY,
        stripe_api_base="http://127.0.0.1:9",  # nothing listens on the discard port
        stripe_max_network_retries=0,
        **CATALOGUE,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            response = await http.post("/billing/checkout", headers=bearer(token()), json={"price_id": PACK})
    assert response.status_code == 502
    assert "Stripe could not be reached" in response.json()["detail"]


async def test_checkout_and_portal_without_a_stripe_key_are_503(
    client: httpx.AsyncClient, auth: dict[str, str]
) -> None:
    for path, body in (("/billing/checkout", {"price_id": PACK}), ("/billing/portal", None)):
        response = await client.post(path, headers=auth, json=body)
        assert response.status_code == 503
        assert "STRIPE_SECRET_KEY" in response.json()["detail"]


async def test_portal(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    # No profile, then a profile without a Stripe customer: 404 either way, and Stripe is not called.
    assert (await billing.post("/billing/portal", headers=auth)).status_code == 404
    assert (await billing.post("/profile", headers=auth)).status_code == 201
    missing = await billing.post("/billing/portal", headers=auth)
    assert missing.status_code == 404
    assert missing.json()["detail"] == "no Stripe customer yet: buy a credit pack or subscribe first"
    assert fake_stripe.requests == []

    assert (await billing.post("/billing/checkout", headers=auth, json={"price_id": PACK})).status_code == 200
    response = await billing.post("/billing/portal", headers=auth)
    assert response.status_code == 200
    assert response.json() == {"url": "https://billing.example/p"}
    portal = fake_stripe.requests[-1]
    assert portal.path == "/v1/billing_portal/sessions"
    assert portal.form == {"customer": "cus_test_0", "return_url": f"{FRONTEND}/billing"}
