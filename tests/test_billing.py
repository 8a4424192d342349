"""Billing: Checkout and the portal against a local fake Stripe, and webhooks with real signatures.

Every webhook here is signed the way Stripe signs them (HMAC-SHA256 of "<t>.<body>" with the endpoint's
secret), and event payloads have the shape of the API version the pinned library uses (2025-03-31 and later:
an invoice's subscription under `parent.subscription_details`, a line's price under `pricing.price_details`,
the billing period on the subscription items).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import stripe
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.application import create_app
from app.config import load_settings
from app.services.credits import find_ledger_mismatches
from tests.conftest import (
    TEST_STRIPE_SECRET_KEY,
    TEST_STRIPE_WEBHOOK_SECRET,
    TokenFactory,
    bearer,
    make_settings,
)

SECRET_KEY = TEST_STRIPE_SECRET_KEY
WEBHOOK_SECRET = TEST_STRIPE_WEBHOOK_SECRET
FRONTEND = "https://app.example.com"
PACK = "price_pack_starter"
PLAN = "price_plan_pro"
HUGE_PACK = "price_pack_big"  # the most credits one price may grant
# stripe-python hands httpx its form body as `data=`, which httpx deprecates; not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

CATALOGUE = {
    "credit_packs": {
        PACK: {"name": "Starter pack", "credits": 500},
        HUGE_PACK: {"name": "Agency pack", "credits": 1_000_000},
    },
    "subscription_plans": {PLAN: {"name": "Pro monthly", "credits": 2000}},
}


# --- A local fake of Stripe's API -------------------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, str]


@dataclass
class FakeStripe:
    """Answers the three calls the API makes and records every request; `failure` makes it answer an error."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    failure: tuple[int, dict[str, Any]] | None = None
    fail_path: str | None = None
    delay: float = 0.0  # seconds before answering: a slow Stripe
    # Like Stripe, a request repeating an idempotency key gets the first answer again.
    answered: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)

    def answer(self, recorded: Recorded) -> tuple[int, dict[str, Any]]:
        if self.failure and (self.fail_path is None or self.fail_path == recorded.path):
            return self.failure
        key = recorded.headers.get("idempotency-key", "")
        if key not in self.answered:
            self.answered[key] = self.create(recorded)
        return self.answered[key]

    def create(self, recorded: Recorded) -> tuple[int, dict[str, Any]]:
        number = len(self.answered)
        if recorded.path == "/v1/customers":
            return 200, {"id": f"cus_test_{number}", "object": "customer", "email": recorded.form.get("email")}
        if recorded.path == "/v1/checkout/sessions":
            session_id = f"cs_test_{number}"
            return 200, {
                "id": session_id,
                "object": "checkout.session",
                "mode": recorded.form["mode"],
                "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            }
        if recorded.path == "/v1/billing_portal/sessions":
            return 200, {
                "id": f"bps_test_{number}",
                "object": "billing_portal.session",
                "url": "https://billing.example/p",
            }
        return 404, {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL {recorded.path}"}}


def start_fake_stripe(fake: FakeStripe) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            recorded = Recorded(
                "POST", self.path, {k.lower(): v for k, v in self.headers.items()}, dict(parse_qsl(body))
            )
            fake.requests.append(recorded)
            time.sleep(fake.delay)
            status, payload = fake.answer(recorded)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Request-Id", f"req_test_{len(fake.requests)}")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeStripe]:
    fake = FakeStripe()
    server = start_fake_stripe(fake)
    yield fake
    server.shutdown()


@pytest.fixture
def fake_stripe(fake_server: FakeStripe) -> FakeStripe:
    fake_server.requests.clear()
    fake_server.answered.clear()
    fake_server.failure = None
    fake_server.fail_path = None
    fake_server.delay = 0.0
    return fake_server


@pytest.fixture(scope="module")
async def billing_app(
    database_url: URL, tmp_path_factory: pytest.TempPathFactory, fake_server: FakeStripe
) -> AsyncIterator[FastAPI]:
    settings = make_settings(
        database_url,
        tmp_path_factory.mktemp("billing"),
        stripe_secret_key=SECRET_KEY,
        stripe_publishable_key="pk_test_picads",
        stripe_webhook_secret=WEBHOOK_SECRET,
        stripe_api_base=fake_server.url,
        stripe_max_network_retries=0,
        stripe_timeout=5,
        frontend_url=FRONTEND + "/",
        **CATALOGUE,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def billing(billing_app: FastAPI, app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app configured for Stripe. (`app` is requested so the database is cleaned after.)"""
    # Our own failures must reach the test as the 500 Stripe would see, not as an exception.
    transport = httpx.ASGITransport(app=billing_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


# --- Signed events shaped like Stripe's -------------------------------------------------------------------------


def signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> dict[str, Any]:
    """The request Stripe would send: the raw JSON body and its Stripe-Signature header."""
    body = json.dumps(event).encode()
    at = int(time.time()) if timestamp is None else timestamp
    signature = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return {
        "content": body,
        "headers": {"Stripe-Signature": f"t={at},v1={signature}", "Content-Type": "application/json"},
    }


def event(kind: str, obj: dict[str, Any], created: int, event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": stripe.api_version,
        "created": created,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
        "data": {"object": obj},
    }


def checkout_session(
    user_id: uuid.UUID,
    *,
    price: str = PACK,
    mode: str = "payment",
    payment_status: str = "paid",
    session_id: str = "cs_test_pack",
    customer: str = "cus_test_buyer",
    subscription: str | None = None,
) -> dict[str, Any]:
    return {
        "id": session_id,
        "object": "checkout.session",
        "mode": mode,
        "status": "complete",
        "payment_status": payment_status,
        "customer": customer,
        "subscription": subscription,
        "client_reference_id": str(user_id),
        "metadata": {"user_id": str(user_id), "price_id": price},
        "amount_total": 900,
        "currency": "usd",
    }


def subscription(
    user_id: uuid.UUID | None,
    *,
    status: str,
    period_end: int,
    cancel_at_period_end: bool = False,
    subscription_id: str = "sub_test_pro",
    customer: str = "cus_test_buyer",
    price: str = PLAN,
) -> dict[str, Any]:
    return {
        "id": subscription_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "cancel_at": period_end if cancel_at_period_end else None,
        "metadata": {"user_id": str(user_id)} if user_id else {},
        "items": {
            "object": "list",
            "has_more": False,
            "data": [
                {
                    "id": "si_test_pro",
                    "object": "subscription_item",
                    "price": {"id": price, "object": "price", "recurring": {"interval": "month"}},
                    "quantity": 1,
                    "current_period_start": period_end - 30 * 86400,
                    "current_period_end": period_end,
                }
            ],
        },
    }


def invoice(
    invoice_id: str,
    user_id: uuid.UUID | None,
    *,
    subscription_id: str = "sub_test_pro",
    customer: str = "cus_test_buyer",
    price: str = PLAN,
    proration: bool = False,
) -> dict[str, Any]:
    return {
        "id": invoice_id,
        "object": "invoice",
        "customer": customer,
        "status": "paid",
        "billing_reason": "subscription_cycle",
        "amount_paid": 1900,
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {
                "subscription": subscription_id,
                "metadata": {"user_id": str(user_id)} if user_id else {},
                "subscription_proration_date": None,
            },
        },
        "lines": {
            "object": "list",
            "has_more": False,
            "data": [
                {
                    "id": f"il_{invoice_id}",
                    "object": "line_item",
                    "amount": 1900,
                    "quantity": 1,
                    "parent": {
                        "type": "subscription_item_details",
                        "invoice_item_details": None,
                        "subscription_item_details": {
                            "subscription": subscription_id,
                            "subscription_item": "si_test_pro",
                            "proration": proration,
                            "proration_details": {"credited_items": None},
                            "invoice_item": None,
                        },
                    },
                    "pricing": {
                        "type": "price_details",
                        "price_details": {"price": price, "product": "prod_test_pro"},
                        "unit_amount_decimal": "1900",
                    },
                }
            ],
        },
    }


async def deliver(client: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
    return await client.post("/webhook", **signed(payload))


async def profile_row(engine: AsyncEngine, user_id: uuid.UUID) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(text("SELECT * FROM profiles WHERE id = :id"), {"id": user_id})).one()


async def grants(engine: AsyncEngine, user_id: uuid.UUID) -> list[tuple[str, int, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT kind, amount, reference FROM credit_entries WHERE profile_id = :id "
                "AND kind IN ('purchase', 'subscription_grant') ORDER BY id"
            ),
            {"id": user_id},
        )
        return [(row.kind, row.amount, row.reference) for row in rows]


async def assert_ledger_consistent(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session:
        assert await find_ledger_mismatches(session) == []


async def stripe_events(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT id, type FROM stripe_events ORDER BY created, id"))
        return [(row.id, row.type) for row in rows]


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
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, token: TokenFactory, user_id: uuid.UUID
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
    assert checkout.form == {
        "mode": "payment",
        "customer": "cus_test_0",
        "line_items[0][price]": PACK,
        "line_items[0][quantity]": "1",
        "client_reference_id": str(user_id),
        "metadata[user_id]": str(user_id),
        "metadata[price_id]": PACK,
        "metadata[credits]": "500",
        "metadata[name]": "Starter pack",
        "success_url": f"{FRONTEND}/billing/success?session_id={{CHECKOUT_SESSION_ID}}",
        "cancel_url": f"{FRONTEND}/billing/cancel",
    }

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


async def test_a_retired_price_is_still_granted_what_was_sold(
    billing: httpx.AsyncClient, engine: AsyncEngine, user_id: uuid.UUID
) -> None:
    """Prices leave the catalogue; payments still due for them (renewals, delayed payments) grant what was sold."""
    retired_plan = invoice("in_test_retired", user_id, price="price_plan_legacy")
    details = retired_plan["parent"]["subscription_details"]
    details["metadata"] = {**details["metadata"], "price_id": "price_plan_legacy", "credits": "1500", "name": "Old"}
    renewal = await deliver(billing, event("invoice.paid", retired_plan, int(time.time())))
    assert renewal.json()["outcome"] == "granted 1500 credits"

    retired_pack = checkout_session(user_id, price="price_pack_legacy", session_id="cs_test_retired")
    retired_pack["metadata"].update({"credits": "300", "name": "Old pack"})
    paid = await deliver(billing, event("checkout.session.completed", retired_pack, int(time.time())))
    assert paid.json()["outcome"] == "granted 300 credits"

    other_price = invoice("in_test_other_price", user_id, price="price_plan_unknown")
    other_details = other_price["parent"]["subscription_details"]
    other_details["metadata"] = {**details["metadata"], "invoice_id": "x"}  # sold: price_plan_legacy, not this one
    ignored = await deliver(billing, event("invoice.paid", other_price, int(time.time())))
    assert ignored.json()["outcome"].startswith("ignored")
    unsold = checkout_session(user_id, price="price_pack_unknown", session_id="cs_test_unsold")  # no credits sold
    assert (
        (await deliver(billing, event("checkout.session.completed", unsold, int(time.time()))))
        .json()["outcome"]
        .startswith("ignored")
    )
    assert sorted(await grants(engine, user_id)) == [
        ("purchase", 300, "cs_test_retired"),
        ("subscription_grant", 1500, "in_test_retired"),
    ]
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
