"""Stripe objects and events as Stripe sends them, signed with the endpoint's secret, and what tests read back.

Every webhook here is signed the way Stripe signs them (HMAC-SHA256 of "<t>.<body>" with the endpoint's
secret), and payloads have the shape of the API version the pinned library uses (2025-03-31 and later: an
invoice's subscription under `parent.subscription_details`, a line's price under `pricing.price_details`, the
billing period on the subscription items, an invoice's payments in a list of their own).

A purchase starts as a real one does: POST /billing/checkout, which records the checkout and asks the fake Stripe
for a session; the builders then describe what Stripe reports about it, and put that state in the fake too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import stripe
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.services.credits import find_ledger_mismatches
from tests.fake_stripe import PACK, PLAN, WEBHOOK_SECRET, FakeStripe

PRICE_OF = {PACK: 900, PLAN: 1900}  # what the tests' prices cost, in cents


def signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> dict[str, Any]:
    """The request Stripe would send: the raw JSON body and its Stripe-Signature header."""
    body = json.dumps(event).encode()
    at = int(time.time()) if timestamp is None else timestamp
    signature = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return {
        "content": body,
        "headers": {"Stripe-Signature": f"t={at},v1={signature}", "Content-Type": "application/json"},
    }


def event(kind: str, obj: dict[str, Any], created: int | None = None, event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": stripe.api_version,
        "created": int(time.time()) if created is None else created,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": kind,
        "data": {"object": obj},
    }


@dataclass(frozen=True)
class Purchase:
    """A checkout made through the API, as the fake Stripe recorded it."""

    session_id: str
    user_id: uuid.UUID
    customer: str
    metadata: dict[str, str]
    price: str
    mode: str


async def purchase(
    billing: httpx.AsyncClient, fake: FakeStripe, headers: dict[str, str], price: str = PACK
) -> Purchase:
    response = await billing.post("/billing/checkout", headers=headers, json={"price_id": price})
    assert response.status_code == 200, response.text
    session = fake.checkout_sessions[response.json()["session_id"]]
    metadata = dict(session["metadata"])
    return Purchase(
        session["id"], uuid.UUID(metadata["user_id"]), session["customer"], metadata, price, session["mode"]
    )


def completed(
    fake: FakeStripe,
    bought: Purchase,
    *,
    payment_status: str = "paid",
    payment_intent: str | None = None,
    subscription_id: str | None = None,
) -> dict[str, Any]:
    """The checkout session as Stripe reports it once the customer went through it (and now holds it)."""
    session = dict(fake.checkout_sessions[bought.session_id])
    session.update(
        status="complete",
        payment_status=payment_status,
        payment_intent=(payment_intent or f"pi_{bought.session_id}") if bought.mode == "payment" else None,
        amount_total=PRICE_OF.get(bought.price, 900),
        currency="usd",
        subscription=subscription_id,
        client_reference_id=str(bought.user_id),
    )
    fake.checkout_sessions[bought.session_id] = session
    return session


def subscription(
    bought: Purchase | None,
    *,
    status: str,
    period_end: int,
    cancel_at_period_end: bool = False,
    subscription_id: str = "sub_test_pro",
    customer: str | None = None,
    price: str = PLAN,
) -> dict[str, Any]:
    return {
        "id": subscription_id,
        "object": "subscription",
        "customer": customer or (bought.customer if bought else "cus_test_someone"),
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "cancel_at": period_end if cancel_at_period_end else None,
        "metadata": dict(bought.metadata) if bought else {},
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
    bought: Purchase | None,
    *,
    subscription_id: str = "sub_test_pro",
    customer: str | None = None,
    price: str = PLAN,
    proration: bool = False,
    quantity: int = 1,
) -> dict[str, Any]:
    return {
        "id": invoice_id,
        "object": "invoice",
        "customer": customer or (bought.customer if bought else "cus_test_someone"),
        "status": "paid",
        "billing_reason": "subscription_cycle",
        "amount_paid": 1900 * quantity,
        "currency": "usd",
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {
                "subscription": subscription_id,
                "metadata": dict(bought.metadata) if bought else {},
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
                    "amount": 1900 * quantity,
                    "quantity": quantity,
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


def paid_invoice(fake: FakeStripe, *args: Any, payment_intent: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """An invoice Stripe holds as paid, with the payment behind it in its payments list."""
    paid = invoice(*args, **kwargs)
    fake.holds(paid)
    fake.pays(paid["id"], payment_intent or f"pi_{paid['id']}", paid["amount_paid"])
    return paid


def charge(payment_intent: str, amount: int, refunded: int = 0) -> dict[str, Any]:
    return {
        "id": f"ch_{payment_intent}",
        "object": "charge",
        "payment_intent": payment_intent,
        "amount": amount,
        "amount_refunded": refunded,
        "refunded": refunded == amount,
        "currency": "usd",
    }


def dispute(dispute_id: str, payment_intent: str, amount: int, status: str) -> dict[str, Any]:
    return {
        "id": dispute_id,
        "object": "dispute",
        "charge": f"ch_{payment_intent}",
        "payment_intent": payment_intent,
        "amount": amount,
        "currency": "usd",
        "status": status,
    }


async def deliver(client: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
    return await client.post("/webhook", **signed(payload))


async def profile_row(engine: AsyncEngine, user_id: uuid.UUID) -> Any:
    async with engine.connect() as connection:
        return (await connection.execute(text("SELECT * FROM profiles WHERE id = :id"), {"id": user_id})).one()


async def grants(engine: AsyncEngine, user_id: uuid.UUID) -> list[tuple[str, int, str]]:
    return await entries(engine, user_id, "purchase", "subscription_grant")


async def entries(engine: AsyncEngine, user_id: uuid.UUID, *kinds: str) -> list[tuple[str, int, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT kind, amount, reference FROM credit_entries WHERE profile_id = :id "
                "AND kind = ANY(:kinds) ORDER BY id"
            ),
            {"id": user_id, "kinds": list(kinds)},
        )
        return [(row.kind, row.amount, row.reference) for row in rows]


async def assert_ledger_consistent(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session:
        assert await find_ledger_mismatches(session) == []


async def stripe_events(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT id, type FROM stripe_events ORDER BY created, id"))
        return [(row.id, row.type) for row in rows]


async def outcomes(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as connection:
        return list(await connection.scalars(text("SELECT outcome FROM stripe_events ORDER BY processed_at, id")))
