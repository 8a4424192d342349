"""Stripe events as Stripe sends them, signed with the endpoint's secret, and what tests read back.

Every webhook here is signed the way Stripe signs them (HMAC-SHA256 of "<t>.<body>" with the endpoint's
secret), and event payloads have the shape of the API version the pinned library uses (2025-03-31 and later:
an invoice's subscription under `parent.subscription_details`, a line's price under `pricing.price_details`,
the billing period on the subscription items).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import httpx
import stripe
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.services.credits import find_ledger_mismatches
from tests.fake_stripe import PACK, PLAN, WEBHOOK_SECRET


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
