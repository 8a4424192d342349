"""The front end's sign-in / sign-up flow and the profile rules."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import TEST_SERVICE_ROLE_KEY, TokenFactory, bearer


async def test_signup_flow(client: httpx.AsyncClient, auth: dict[str, str], user_id: uuid.UUID) -> None:
    missing = await client.get("/profile", headers=auth)
    assert missing.status_code == 404
    assert "POST /profile" in missing.json()["detail"]

    created = await client.post("/profile", headers=auth, json={"full_name": "  Ada Lovelace "})
    assert created.status_code == 201
    profile = created.json()
    assert profile["id"] == str(user_id)
    assert profile["credits"] == 1000
    assert profile["full_name"] == "Ada Lovelace"

    fetched = await client.get("/profile", headers=auth)
    assert fetched.status_code == 200
    assert fetched.json() == profile

    again = await client.post("/profile", headers=auth, json={"full_name": "Someone Else"})
    assert again.status_code == 200
    assert again.json() == profile

    renamed = await client.put("/profile", headers=auth, json={"full_name": "Ada King"})
    assert renamed.status_code == 200
    assert renamed.json()["full_name"] == "Ada King"
    assert renamed.json()["credits"] == 1000
    assert renamed.json()["updated_at"] > profile["updated_at"]


async def test_post_without_body_creates_profile(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    response = await client.post("/profile", headers=auth)
    assert response.status_code == 201
    assert response.json()["full_name"] is None


async def test_concurrent_first_sign_in_makes_one_row(
    client: httpx.AsyncClient, auth: dict[str, str], user_id: uuid.UUID, engine: AsyncEngine
) -> None:
    responses = await asyncio.gather(*(client.post("/profile", headers=auth, json={}) for _ in range(20)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 19 + [201]
    assert len({response.json()["created_at"] for response in responses}) == 1
    async with engine.connect() as connection:
        count = await connection.scalar(text("SELECT count(*) FROM profiles WHERE id = :id"), {"id": user_id})
        entries = (
            await connection.execute(
                text("SELECT kind, amount, reference FROM credit_entries WHERE profile_id = :id"), {"id": user_id}
            )
        ).all()
        balance = await connection.scalar(text("SELECT credits FROM profiles WHERE id = :id"), {"id": user_id})
    assert count == 1
    # Exactly one signup grant, written as the auth.users trigger writes it, and the balance is its ledger.
    assert [tuple(entry) for entry in entries] == [("signup_grant", 1000, "signup")]
    assert balance == 1000


@pytest.mark.parametrize(
    "body",
    [
        {"full_name": "Jane", "credits": 1500},
        {"credits": 999999},
        {"full_name": "Jane", "stripe_customer_id": "cus_123"},
        {"full_name": "Jane", "subscription_status": "active"},
    ],
)
async def test_user_cannot_set_credits_or_billing(
    client: httpx.AsyncClient, auth: dict[str, str], body: dict[str, object]
) -> None:
    await client.post("/profile", headers=auth, json={"full_name": "Ada"})
    response = await client.put("/profile", headers=auth, json=body)
    assert response.status_code == 403
    assert "cannot be set" in response.json()["detail"]
    after = (await client.get("/profile", headers=auth)).json()
    assert after["credits"] == 1000
    assert after["full_name"] == "Ada"
    assert after["stripe_customer_id"] is None


async def test_create_cannot_set_credits(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    response = await client.post("/profile", headers=auth, json={"full_name": "Ada", "credits": 5000})
    assert response.status_code == 403
    assert (await client.get("/profile", headers=auth)).status_code == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"full_name": "   "}, "must not be empty"),
        ({"full_name": "x" * 201}, "at most 200"),
        ({"full_name": "Ada\nLovelace"}, "control characters"),
        ({"full_name": 42}, "valid string"),
        ({"nickname": "Ada"}, "Extra inputs"),
        ({}, "Field required"),
    ],
)
async def test_invalid_update_is_422(
    client: httpx.AsyncClient, auth: dict[str, str], body: dict[str, object], message: str
) -> None:
    await client.post("/profile", headers=auth, json={"full_name": "Ada"})
    response = await client.put("/profile", headers=auth, json=body)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])
    assert (await client.get("/profile", headers=auth)).json()["full_name"] == "Ada"


@pytest.mark.parametrize(
    "name",
    ["Ada \u202eecalevoL", "\u200b", "\ufeff", "A\u200bda", "Ada \u2066Lovelace\u2069", "Ada\u00adLovelace"],
    ids=["right-to-left-override", "zero-width-space", "lone-bom", "hidden-space", "isolate", "soft-hyphen"],
)
async def test_invisible_and_direction_changing_characters_are_422(
    client: httpx.AsyncClient, auth: dict[str, str], name: str
) -> None:
    """They make a name show as something else (U+202E writes what follows backwards) or as nothing at all."""
    await client.post("/profile", headers=auth, json={"full_name": "Ada"})
    response = await client.put("/profile", headers=auth, json={"full_name": name})
    assert response.status_code == 422
    assert "invisible formatting characters" in str(response.json()["detail"])
    assert (await client.get("/profile", headers=auth)).json()["full_name"] == "Ada"


async def test_names_that_need_joiners_are_accepted(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    await client.post("/profile", headers=auth)
    for name in ("\u0639\u0644\u06cc\u200c\u0631\u0636\u0627", "\U0001f469\u200d\U0001f4bb Ada"):  # ZWNJ, ZWJ
        response = await client.put("/profile", headers=auth, json={"full_name": name})
        assert response.status_code == 200
        assert response.json()["full_name"] == name


async def test_full_name_can_be_cleared_and_is_200_chars_max(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    await client.post("/profile", headers=auth)
    longest = await client.put("/profile", headers=auth, json={"full_name": "é" * 200})
    assert longest.status_code == 200
    cleared = await client.put("/profile", headers=auth, json={"full_name": None})
    assert cleared.status_code == 200
    assert cleared.json()["full_name"] is None


async def test_update_before_create_is_404(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    response = await client.put("/profile", headers=auth, json={"full_name": "Ada"})
    assert response.status_code == 404


async def test_malformed_json_is_422(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    response = await client.put(
        "/profile", headers={**auth, "Content-Type": "application/json"}, content=b'{"full_name": '
    )
    assert response.status_code == 422


async def test_users_see_only_their_own_profile(client: httpx.AsyncClient, token: TokenFactory) -> None:
    alice, bob = bearer(token(email="alice@example.com")), bearer(token(email="bob@example.com"))
    await client.post("/profile", headers=alice, json={"full_name": "Alice"})
    assert (await client.get("/profile", headers=bob)).status_code == 404
    await client.post("/profile", headers=bob, json={"full_name": "Bob"})
    await client.put("/profile", headers=bob, json={"full_name": "Bobby"})
    assert (await client.get("/profile", headers=alice)).json()["full_name"] == "Alice"


async def test_dashboard(client: httpx.AsyncClient, token: TokenFactory, user_id: uuid.UUID) -> None:
    headers = bearer(token(user_id, email="ada@example.com"))
    before = await client.get("/dashboard", headers=headers)
    assert before.status_code == 200
    assert before.json() == {
        "user": {"id": str(user_id), "email": "ada@example.com", "role": "authenticated"},
        "profile": None,
        "balance": None,
        "held": None,
        "available": None,
        "recent_entries": [],
    }
    await client.post("/profile", headers=headers, json={"full_name": "Ada"})
    after = (await client.get("/dashboard", headers=headers)).json()
    assert after["profile"]["credits"] == 1000
    assert after["profile"]["full_name"] == "Ada"
    assert after["balance"] == 1000
    assert [(e["kind"], e["amount"]) for e in after["recent_entries"]] == [("signup_grant", 1000)]


async def test_service_role_has_no_profile(client: httpx.AsyncClient) -> None:
    response = await client.get("/profile", headers=bearer(TEST_SERVICE_ROLE_KEY))
    assert response.status_code == 403
    assert "service role" in response.json()["detail"]


async def test_public_endpoints(client: httpx.AsyncClient, auth: dict[str, str], user_id: uuid.UUID) -> None:
    assert (await client.get("/")).json()["message"].startswith("Welcome")
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": "ok"}

    anonymous = await client.get("/public-data")
    assert anonymous.status_code == 200
    assert anonymous.json()["authenticated"] is False

    known = await client.get("/public-data", headers=auth)
    assert known.json()["authenticated"] is True
    assert known.json()["user_id"] == str(user_id)

    bad = await client.get("/public-data", headers=bearer("not-a-token"))
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [("http://localhost:5173", True), ("http://localhost:5174", True), ("https://evil.example", False)],
)
async def test_cors_preflight(client: httpx.AsyncClient, origin: str, allowed: bool) -> None:
    response = await client.options(
        "/profile",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    if allowed:
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == origin
        assert response.headers["access-control-allow-credentials"] == "true"
    else:
        assert response.status_code == 400
        assert "access-control-allow-origin" not in response.headers


async def test_docs_describe_the_api(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["SupabaseBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/profile"]["get"]["security"] == [{"SupabaseBearer": []}]
    assert schema["paths"]["/public-data"]["get"]["security"] == [{}, {"SupabaseBearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), f"{method} {path} has no summary"
            assert operation.get("tags"), f"{method} {path} has no tags"
    put = schema["paths"]["/profile"]["put"]
    assert {"401", "403", "404", "422"} <= set(put["responses"])
    assert "webhook" not in put["responses"]["400"]["description"]
    # The optional body is shown as what it is, not as "any of ProfileCreate / null".
    body = schema["paths"]["/profile"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ProfileCreate"}
    assert not body.get("required")
    assert "Authorize** button above" not in schema["info"]["description"]  # ReDoc has no such button
    assert (await client.get("/docs")).status_code == 200
    assert (await client.get("/redoc")).status_code == 200


async def test_an_anonymous_sign_in_gets_the_signup_grant_only_with_a_permanent_account(
    client: httpx.AsyncClient, token: TokenFactory, user_id: uuid.UUID, engine: AsyncEngine
) -> None:
    """Throwaway anonymous accounts do not farm free credits: the grant comes, once, with a permanent account."""
    anonymous = bearer(token(user_id, email=None, is_anonymous=True))
    created = await client.post("/profile", headers=anonymous)
    assert created.status_code == 201
    assert (created.json()["credits"], created.json()["anonymous"]) == (0, True)  # ANONYMOUS_SIGNUP_CREDITS
    assert (await client.get("/profile", headers=anonymous)).json()["credits"] == 0
    # The same user, now with a permanent account (Supabase keeps the id when it converts one).
    permanent = bearer(token(user_id, email="ada@example.com", is_anonymous=False))
    converted = (await client.get("/profile", headers=permanent)).json()
    assert (converted["credits"], converted["anonymous"]) == (1000, False)
    for _ in range(2):  # seen again, either way: no second grant
        await client.get("/profile", headers=permanent)
        await client.get("/profile", headers=anonymous)
    assert (await client.get("/dashboard", headers=permanent)).json()["balance"] == 1000
    async with engine.connect() as connection:
        kinds = list(
            await connection.scalars(
                text("SELECT kind FROM credit_entries WHERE profile_id = :id ORDER BY id"), {"id": user_id}
            )
        )
    assert kinds == ["signup_grant"]
