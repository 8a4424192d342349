"""Credit holds under real concurrency: reserve, capture or release once, expire by themselves."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.services.credits import find_ledger_mismatches
from tests.conftest import TEST_SERVICE_ROLE_KEY, TokenFactory, bearer

SERVICE = bearer(TEST_SERVICE_ROLE_KEY)


@pytest.fixture
async def member(client: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, str]:
    """A signed-in user with a profile (1000 credits)."""
    assert (await client.post("/profile", headers=auth)).status_code == 201
    return auth


async def hold(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> httpx.Response:
    return await client.post("/credits/holds", headers=headers, json={"amount": 100, **body})


async def figures(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[int, int, int]:
    profile = (await client.get("/profile", headers=headers)).json()
    return profile["credits"], profile["held"], profile["available"]


async def assert_invariants(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session:
        assert await find_ledger_mismatches(session) == []


async def test_a_hold_reserves_and_a_capture_spends_it(
    client: httpx.AsyncClient, member: dict[str, str], engine: AsyncEngine
) -> None:
    created = await hold(client, member, amount=100, reason="ad image", ttl_seconds=600)
    assert created.status_code == 201
    body = created.json()
    assert body["hold"]["state"] == "active"
    assert body["balance"] == {"credits": 1000, "held": 100, "available": 900}
    assert await figures(client, member) == (1000, 100, 900)
    listed = (await client.get("/credits/holds", headers=member)).json()["holds"]
    assert [h["id"] for h in listed] == [body["hold"]["id"]]

    captured = await client.post(f"/credits/holds/{body['hold']['id']}/capture", headers=member)
    assert captured.status_code == 200
    answer = captured.json()
    assert answer["hold"]["state"] == "captured"
    assert answer["hold"]["captured"] == 100
    assert answer["balance"] == {"credits": 900, "held": 0, "available": 900}
    assert answer["entry"]["amount"] == -100
    assert answer["entry"]["kind"] == "spend"
    assert answer["entry"]["reference"] == f"hold:{body['hold']['id']}"
    assert answer["entry"]["note"] == "ad image"
    assert (await client.get("/credits/holds", headers=member)).json()["holds"] == []
    await assert_invariants(engine)


async def test_a_partial_capture_gives_back_the_rest(client: httpx.AsyncClient, member: dict[str, str]) -> None:
    hold_id = (await hold(client, member, amount=100)).json()["hold"]["id"]
    answer = (await client.post(f"/credits/holds/{hold_id}/capture", headers=member, json={"amount": 30})).json()
    assert answer["hold"]["captured"] == 30
    assert answer["balance"] == {"credits": 970, "held": 0, "available": 970}
    too_much = await hold(client, member, amount=50)
    over = await client.post(
        f"/credits/holds/{too_much.json()['hold']['id']}/capture", headers=member, json={"amount": 51}
    )
    assert over.status_code == 422
    assert "the hold is for 50" in over.json()["detail"]


async def test_a_release_spends_nothing(client: httpx.AsyncClient, member: dict[str, str], engine: AsyncEngine) -> None:
    hold_id = (await hold(client, member, amount=400)).json()["hold"]["id"]
    released = await client.post(f"/credits/holds/{hold_id}/release", headers=member)
    assert released.status_code == 200
    assert released.json()["hold"]["state"] == "released"
    assert released.json()["entry"] is None
    assert await figures(client, member) == (1000, 0, 1000)
    await assert_invariants(engine)


async def test_concurrent_holds_never_reserve_more_than_is_there(
    client: httpx.AsyncClient, member: dict[str, str], engine: AsyncEngine
) -> None:
    answers = await asyncio.gather(*(hold(client, member, amount=30) for _ in range(50)))
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(201) == 33
    assert statuses.count(402) == 17
    refused = next(answer for answer in answers if answer.status_code == 402)
    assert refused.json()["available"] < 30
    assert await figures(client, member) == (1000, 990, 10)
    # Spends see what is held: 10 credits are available, not 1000.
    assert (await client.post("/credits/spend", headers=member, json={"amount": 11})).status_code == 402
    assert (await client.post("/credits/spend", headers=member, json={"amount": 10})).status_code == 200
    await assert_invariants(engine)


async def test_holds_and_spends_racing_never_overdraw(
    client: httpx.AsyncClient, member: dict[str, str], engine: AsyncEngine
) -> None:
    async def one(index: int) -> httpx.Response:
        if index % 2:
            return await hold(client, member, amount=30)
        return await client.post("/credits/spend", headers=member, json={"amount": 30})

    answers = await asyncio.gather(*(one(index) for index in range(60)))
    assert [answer.status_code for answer in answers].count(402) == 60 - 33
    credits, held, available = await figures(client, member)
    assert available == 10
    assert credits - held == 10
    await assert_invariants(engine)


async def test_a_capture_and_a_release_racing_one_wins(
    client: httpx.AsyncClient, member: dict[str, str], engine: AsyncEngine
) -> None:
    for _ in range(5):
        hold_id = (await hold(client, member, amount=10)).json()["hold"]["id"]
        captured, released = await asyncio.gather(
            client.post(f"/credits/holds/{hold_id}/capture", headers=member),
            client.post(f"/credits/holds/{hold_id}/release", headers=member),
        )
        assert sorted([captured.status_code, released.status_code]) == [200, 409]
    credits, held, _ = await figures(client, member)
    assert held == 0
    await assert_invariants(engine)
    async with engine.connect() as connection:
        spent = await connection.scalar(
            text("SELECT coalesce(sum(amount), 0) FROM credit_entries WHERE kind = 'spend'")
        )
    assert credits == 1000 + spent


async def test_a_hold_resolves_once(client: httpx.AsyncClient, member: dict[str, str]) -> None:
    hold_id = (await hold(client, member, amount=100)).json()["hold"]["id"]
    key = {"Idempotency-Key": "capture-1"}
    first = await client.post(f"/credits/holds/{hold_id}/capture", headers={**member, **key}, json={"amount": 60})
    retried = await client.post(f"/credits/holds/{hold_id}/capture", headers={**member, **key}, json={"amount": 60})
    assert first.status_code == retried.status_code == 200
    assert retried.json()["hold"] == first.json()["hold"]
    assert retried.json()["entry"] == first.json()["entry"]
    # Anything else is a conflict: another amount, no key, another key, a release.
    for path, headers, body in (
        ("capture", {**member, **key}, {"amount": 50}),
        ("capture", member, None),
        ("capture", {**member, "Idempotency-Key": "capture-2"}, None),
        ("release", {**member, **key}, None),
    ):
        again = await client.post(f"/credits/holds/{hold_id}/{path}", headers=headers, json=body)
        assert again.status_code == 409, (path, headers, body)
        assert again.json()["detail"] == "hold already captured"
    assert await figures(client, member) == (940, 0, 940)


async def test_an_expired_hold_stops_counting_and_cannot_be_captured(
    client: httpx.AsyncClient, member: dict[str, str], engine: AsyncEngine
) -> None:
    hold_id = (await hold(client, member, amount=900, ttl_seconds=1)).json()["hold"]["id"]
    await asyncio.sleep(1.2)
    # Nothing ran in between: it stopped counting by itself.
    assert await figures(client, member) == (1000, 0, 1000)
    assert (await client.get("/credits/holds", headers=member)).json()["holds"] == []
    late = await client.post(f"/credits/holds/{hold_id}/capture", headers=member)
    assert late.status_code == 409
    assert late.json()["detail"] == "hold expired"
    # A spend that needs those credits marks it expired and goes through.
    assert (await client.post("/credits/spend", headers=member, json={"amount": 950})).status_code == 200
    async with engine.connect() as connection:
        state = await connection.scalar(text("SELECT state FROM credit_holds WHERE id = :id"), {"id": hold_id})
    assert state == "expired"
    await assert_invariants(engine)


async def test_retries_with_one_key_make_one_hold(
    client: httpx.AsyncClient, member: dict[str, str], engine: AsyncEngine
) -> None:
    headers = {**member, "Idempotency-Key": "job-42"}
    answers = await asyncio.gather(*(hold(client, headers, amount=70, reason="job 42") for _ in range(20)))
    assert {answer.status_code for answer in answers} == {201}
    assert len({answer.json()["hold"]["id"] for answer in answers}) == 1
    assert await figures(client, member) == (1000, 70, 930)
    conflict = await hold(client, headers, amount=71, reason="job 42")
    assert conflict.status_code == 409
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM credit_holds")) == 1


async def test_a_worker_with_the_service_role_settles_a_users_hold(
    client: httpx.AsyncClient, member: dict[str, str]
) -> None:
    hold_id = (await hold(client, member, amount=100)).json()["hold"]["id"]
    captured = await client.post(f"/credits/holds/{hold_id}/capture", headers=SERVICE, json={"amount": 25})
    assert captured.status_code == 200
    assert captured.json()["balance"] == {"credits": 975, "held": 0, "available": 975}
    other_id = (await hold(client, member, amount=100)).json()["hold"]["id"]
    assert (await client.post(f"/credits/holds/{other_id}/release", headers=SERVICE)).status_code == 200
    # The service role has no holds of its own to list or make.
    assert (await client.get("/credits/holds", headers=SERVICE)).status_code == 403


async def test_another_users_hold_is_not_found(
    client: httpx.AsyncClient, member: dict[str, str], token: TokenFactory
) -> None:
    hold_id = (await hold(client, member, amount=100)).json()["hold"]["id"]
    stranger = bearer(token(uuid.uuid4()))
    assert (await client.post("/profile", headers=stranger)).status_code == 201
    for action in ("capture", "release"):
        answer = await client.post(f"/credits/holds/{hold_id}/{action}", headers=stranger)
        assert answer.status_code == 404
        assert answer.json()["detail"] == "hold not found"
    unknown = await client.post(f"/credits/holds/{uuid.uuid4()}/capture", headers=member)
    assert unknown.status_code == 404
    assert await figures(client, member) == (1000, 100, 900)


@pytest.mark.parametrize(
    "body",
    [{"amount": 0}, {"amount": 10, "ttl_seconds": 0}, {"amount": 10, "ttl_seconds": 86_401}, {"amount": "10"}],
)
async def test_invalid_holds_are_422(client: httpx.AsyncClient, member: dict[str, str], body: dict[str, Any]) -> None:
    assert (await client.post("/credits/holds", headers=member, json=body)).status_code == 422


async def test_a_hold_needs_a_profile(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    assert (await hold(client, auth)).status_code == 404


async def test_hold_references_are_not_idempotency_keys(client: httpx.AsyncClient, member: dict[str, str]) -> None:
    headers = {**member, "Idempotency-Key": "hold:123"}
    refused = await client.post("/credits/spend", headers=headers, json={"amount": 1})
    assert refused.status_code == 422
    assert "reserved" in refused.json()["detail"]
