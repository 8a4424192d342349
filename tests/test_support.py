"""Support's view of a user: what their flow wrote (a checkout, a webhook grant, a spend, a hold), found from the
user id, their email or their Stripe customer; and only for the service role."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import TEST_SERVICE_ROLE_KEY, TokenFactory, bearer
from tests.fake_stripe import PACK, FakeStripe
from tests.stripe_payloads import completed, deliver, event, purchase

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

ADMIN = bearer(TEST_SERVICE_ROLE_KEY)


async def _a_users_flow(billing: httpx.AsyncClient, fake_stripe: FakeStripe, auth: dict[str, str]) -> dict[str, Any]:
    """A pack bought and granted by the webhook, a spend, a hold: what support will be asked about."""
    bought = await purchase(billing, fake_stripe, auth, PACK)
    payload = event("checkout.session.completed", completed(fake_stripe, bought, payment_intent="pi_support"))
    assert (await deliver(billing, payload)).json()["outcome"] == "granted 500 credits"
    spent = await billing.post("/credits/spend", headers=auth, json={"amount": 30, "reason": "ad image"})
    assert spent.status_code == 200
    held = await billing.post("/credits/holds", headers=auth, json={"amount": 40, "reason": "job-7"})
    assert held.status_code == 201
    return {"purchase": bought, "event_id": payload["id"], "hold_id": held.json()["hold"]["id"]}


async def test_the_support_view_shows_what_a_users_flow_wrote(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, token: TokenFactory, user_id: uuid.UUID
) -> None:
    auth = bearer(token(user_id, email="Ada.Lovelace@Example.com"))
    flow = await _a_users_flow(billing, fake_stripe, auth)

    response = await billing.get(f"/admin/profiles/{user_id}", headers=ADMIN)
    assert response.status_code == 200
    view = response.json()
    profile = view["profile"]
    assert (profile["id"], profile["credits"], profile["held"], profile["available"]) == (
        str(user_id),
        1000 + 500 - 30,
        40,
        1000 + 500 - 30 - 40,
    )
    assert profile["stripe_customer_id"] == flow["purchase"].customer
    assert view["email"] == "ada.lovelace@example.com"
    assert [(entry["kind"], entry["amount"]) for entry in view["recent_entries"]] == [
        ("spend", -30),
        ("purchase", 500),
        ("signup_grant", 1000),
    ]
    assert [(hold["id"], hold["amount"], hold["reason"]) for hold in view["active_holds"]] == [
        (flow["hold_id"], 40, "job-7")
    ]
    (stripe_event,) = view["stripe_events"]
    assert (stripe_event["id"], stripe_event["type"], stripe_event["outcome"]) == (
        flow["event_id"],
        "checkout.session.completed",
        "granted 500 credits",
    )
    (checkout,) = view["checkouts"]
    assert (checkout["id"], checkout["price_id"], checkout["credits"]) == (flow["purchase"].session_id, PACK, 500)
    (payment,) = view["payments"]
    assert (payment["id"], payment["grant_reference"], payment["credits_granted"], payment["amount_paid"]) == (
        "pi_support",
        flow["purchase"].session_id,
        500,
        900,
    )


async def test_support_finds_a_user_by_email_or_stripe_customer(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, token: TokenFactory, user_id: uuid.UUID
) -> None:
    auth = bearer(token(user_id, email="grace@example.com"))
    flow = await _a_users_flow(billing, fake_stripe, auth)
    other = bearer(token(uuid.uuid4(), email="someone.else@example.com"))
    assert (await billing.post("/profile", headers=other)).status_code == 201

    # As a customer writes it in a support mail: any case, stray spaces.
    for query in ({"email": " Grace@Example.COM "}, {"stripe_customer_id": flow["purchase"].customer}):
        response = await billing.get("/admin/profiles", params=query, headers=ADMIN)
        assert response.status_code == 200, response.text
        (found,) = response.json()["profiles"]
        assert found["profile"]["id"] == str(user_id)
        assert [entry["kind"] for entry in found["recent_entries"]] == ["spend", "purchase", "signup_grant"]

    nobody = await billing.get("/admin/profiles", params={"email": "nobody@example.com"}, headers=ADMIN)
    assert nobody.json() == {"profiles": []}
    for wrong in ({}, {"email": "a@example.com", "stripe_customer_id": "cus_1"}, {"emial": "a@example.com"}):
        assert (await billing.get("/admin/profiles", params=wrong, headers=ADMIN)).status_code == 422


async def test_support_reads_current_emails_from_supabase_auth_users(
    client: httpx.AsyncClient, engine: AsyncEngine, token: TokenFactory, user_id: uuid.UUID
) -> None:
    """Where Supabase's auth.users exists, a user who changed their email there is found by the new one."""
    assert (await client.post("/profile", headers=bearer(token(user_id, email="old@example.com")))).status_code == 201
    async with engine.begin() as connection:
        had_auth = await connection.scalar(text("SELECT to_regnamespace('auth') IS NOT NULL"))
        await connection.execute(text("CREATE SCHEMA IF NOT EXISTS auth"))
        await connection.execute(text("CREATE TABLE auth.users (id uuid PRIMARY KEY, email text)"))
        await connection.execute(text("INSERT INTO auth.users VALUES (:id, 'new@example.com')"), {"id": user_id})
    try:
        found = await client.get("/admin/profiles", params={"email": "NEW@example.com"}, headers=ADMIN)
        (view,) = found.json()["profiles"]
        assert (view["profile"]["id"], view["email"]) == (str(user_id), "new@example.com")
        old = await client.get("/admin/profiles", params={"email": "old@example.com"}, headers=ADMIN)
        assert [view["profile"]["id"] for view in old.json()["profiles"]] == [str(user_id)]
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("DROP TABLE auth.users" if had_auth else "DROP SCHEMA auth CASCADE"))


async def test_the_support_view_is_for_the_service_role_only(
    client: httpx.AsyncClient, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    assert (await client.post("/profile", headers=auth)).status_code == 201
    for path, params in ((f"/admin/profiles/{user_id}", {}), ("/admin/profiles", {"email": "user@example.com"})):
        assert (await client.get(path, params=params)).status_code == 401
        assert (await client.get(path, params=params, headers=bearer("not-a-token"))).status_code == 401
        refused = await client.get(path, params=params, headers=auth)  # the user themselves
        assert refused.status_code == 403
        assert refused.json()["detail"] == "this endpoint needs the service role"
    unknown = await client.get(f"/admin/profiles/{uuid.uuid4()}", headers=ADMIN)
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "no profile with this user id"
    assert (await client.get("/admin/profiles/not-a-uuid", headers=ADMIN)).status_code == 422
