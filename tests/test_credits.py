"""The credits ledger under real concurrency: atomic spends, idempotent retries, history, adjustments."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.application import create_app
from app.services.credits import find_ledger_mismatches
from tests.conftest import TEST_SERVICE_ROLE_KEY, TokenFactory, bearer, make_settings, sign

SERVICE = bearer(TEST_SERVICE_ROLE_KEY)


async def mismatches(engine: AsyncEngine) -> list[Any]:
    async with AsyncSession(engine) as session:
        return await find_ledger_mismatches(session)


@pytest.fixture
async def member(client: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, str]:
    """A signed-in user with a profile (1000 credits)."""
    assert (await client.post("/profile", headers=auth)).status_code == 201
    return auth


async def test_spend(client: httpx.AsyncClient, member: dict[str, str], engine: AsyncEngine) -> None:
    response = await client.post("/credits/spend", headers=member, json={"amount": 30, "reason": "ad image"})
    assert response.status_code == 200
    body = response.json()
    assert body["balance"] == 970
    assert body["entry"]["amount"] == -30
    assert body["entry"]["balance_after"] == 970
    assert body["entry"]["kind"] == "spend"
    assert body["entry"]["note"] == "ad image"
    assert (await client.get("/profile", headers=member)).json()["credits"] == 970
    assert await mismatches(engine) == []


async def test_concurrent_spends_never_overdraw(
    client: httpx.AsyncClient, member: dict[str, str], user_id: uuid.UUID, engine: AsyncEngine
) -> None:
    responses = await asyncio.gather(
        *(client.post("/credits/spend", headers=member, json={"amount": 30}) for _ in range(50))
    )
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 33
    assert statuses.count(402) == 17
    assert sorted(r.json()["balance"] for r in responses if r.status_code == 200) == list(range(10, 1000, 30))
    assert (await client.get("/profile", headers=member)).json()["credits"] == 10
    async with engine.connect() as connection:
        count, total = (
            await connection.execute(
                text("SELECT count(*), sum(amount) FROM credit_entries WHERE profile_id = :id"), {"id": user_id}
            )
        ).one()
    assert (count, total) == (34, 10)
    assert await mismatches(engine) == []


async def test_too_low_balance_is_402_with_the_numbers(client: httpx.AsyncClient, member: dict[str, str]) -> None:
    response = await client.post("/credits/spend", headers=member, json={"amount": 1001})
    assert response.status_code == 402
    assert response.json() == {
        "detail": "not enough credits: 1000 available, 1001 requested",
        "balance": 1000,
        "held": 0,
        "available": 1000,
        "requested": 1001,
    }
    assert (await client.get("/profile", headers=member)).json()["credits"] == 1000


async def test_spend_without_profile_is_404(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    response = await client.post("/credits/spend", headers=auth, json={"amount": 1})
    assert response.status_code == 404
    keyed = await client.post("/credits/spend", headers={**auth, "Idempotency-Key": "k"}, json={"amount": 1})
    assert keyed.status_code == 404


async def test_idempotent_retries_charge_once(
    client: httpx.AsyncClient, member: dict[str, str], engine: AsyncEngine
) -> None:
    headers = {**member, "Idempotency-Key": str(uuid.uuid4())}
    body = {"amount": 25, "reason": "ad image"}
    responses = await asyncio.gather(*(client.post("/credits/spend", headers=headers, json=body) for _ in range(20)))
    assert {response.status_code for response in responses} == {200}
    assert len({response.text for response in responses}) == 1
    assert responses[0].json()["balance"] == 975
    assert (await client.get("/profile", headers=member)).json()["credits"] == 975

    later = await client.post("/credits/spend", headers=headers, json=body)
    assert later.text == responses[0].text
    assert await mismatches(engine) == []


async def test_reused_key_with_another_body_is_409(client: httpx.AsyncClient, member: dict[str, str]) -> None:
    headers = {**member, "Idempotency-Key": "order-1"}
    assert (await client.post("/credits/spend", headers=headers, json={"amount": 10})).status_code == 200
    for other in ({"amount": 11}, {"amount": 10, "reason": "something else"}):
        response = await client.post("/credits/spend", headers=headers, json=other)
        assert response.status_code == 409
        assert "Idempotency-Key" in response.json()["detail"]
    assert (await client.get("/profile", headers=member)).json()["credits"] == 990


async def test_idempotency_keys_are_per_user(client: httpx.AsyncClient, token: TokenFactory) -> None:
    alice, bob = bearer(token()), bearer(token())
    for headers in (alice, bob):
        await client.post("/profile", headers=headers)
        spent = await client.post("/credits/spend", headers={**headers, "Idempotency-Key": "same"}, json={"amount": 5})
        assert spent.json()["balance"] == 995


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"amount": 0}, "greater than or equal to 1"),
        ({"amount": -5}, "greater than or equal to 1"),
        ({"amount": 2.5}, "valid integer"),
        ({"amount": 2.000001}, "valid integer"),
        ({"amount": "30"}, "valid integer"),
        ({"amount": 1_000_001}, "less than or equal to 1000000"),
        ({"amount": True}, "valid integer"),
        ({"reason": "x"}, "Field required"),
        ({"amount": 1, "reason": "x" * 201}, "at most 200"),
        ({"amount": 1, "credits": 5}, "Extra inputs"),
        (None, "Field required"),
    ],
)
async def test_invalid_spend_is_422(
    client: httpx.AsyncClient, member: dict[str, str], body: dict[str, Any] | None, message: str
) -> None:
    response = await client.post("/credits/spend", headers=member, json=body)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])
    assert (await client.get("/profile", headers=member)).json()["credits"] == 1000


async def test_a_whole_number_written_as_a_float_is_that_number(
    client: httpx.AsyncClient, member: dict[str, str]
) -> None:
    headers = {**member, "Content-Type": "application/json"}
    response = await client.post("/credits/spend", headers=headers, content=b'{"amount": 3.0}')
    assert response.status_code == 200
    assert response.json()["balance"] == 997


async def test_bad_idempotency_key_is_422(client: httpx.AsyncClient, member: dict[str, str]) -> None:
    response = await client.post("/credits/spend", headers={**member, "Idempotency-Key": "k" * 256}, json={"amount": 1})
    assert response.status_code == 422


async def test_pagination_walks_every_entry_once(client: httpx.AsyncClient, member: dict[str, str]) -> None:
    for number in range(1, 24):
        await client.post("/credits/spend", headers=member, json={"amount": 1, "reason": f"spend {number}"})
    seen: list[int] = []
    cursor: int | None = None
    pages = 0
    while True:
        params: dict[str, int] = {"limit": 5} if cursor is None else {"limit": 5, "before": cursor}
        page = (await client.get("/credits/transactions", headers=member, params=params)).json()
        pages += 1
        seen.extend(entry["id"] for entry in page["entries"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 5
    assert len(seen) == 24 == len(set(seen))
    assert seen == sorted(seen, reverse=True)
    first = (await client.get("/credits/transactions", headers=member)).json()["entries"]
    assert first[0]["note"] == "spend 23"
    assert first[-1]["note"] == "spend 4"
    oldest = (await client.get("/credits/transactions", headers=member, params={"before": seen[-2]})).json()
    assert [e["kind"] for e in oldest["entries"]] == ["signup_grant"]


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"before": 0}, {"before": "abc"}, {"limt": 5}])
async def test_bad_pagination_is_422(client: httpx.AsyncClient, member: dict[str, str], params: dict[str, Any]) -> None:
    assert (await client.get("/credits/transactions", headers=member, params=params)).status_code == 422


async def test_users_see_only_their_own_entries(client: httpx.AsyncClient, token: TokenFactory) -> None:
    alice, bob = bearer(token()), bearer(token())
    for headers in (alice, bob):
        await client.post("/profile", headers=headers)
    await client.post("/credits/spend", headers=alice, json={"amount": 7})
    bobs = (await client.get("/credits/transactions", headers=bob)).json()["entries"]
    assert [entry["kind"] for entry in bobs] == ["signup_grant"]


async def test_service_role_adjustment(
    client: httpx.AsyncClient, member: dict[str, str], user_id: uuid.UUID, engine: AsyncEngine
) -> None:
    url = f"/admin/profiles/{user_id}/credits"
    added = await client.post(url, headers=SERVICE, json={"amount": 250, "reason": "support refund"})
    assert added.status_code == 200
    assert added.json()["balance"] == 1250
    assert added.json()["entry"]["kind"] == "adjustment"
    assert added.json()["entry"]["note"] == "support refund"

    legacy_service_jwt = bearer(sign({"iss": "supabase", "role": "service_role", "iat": 1, "exp": 2_000_000_000}))
    taken = await client.post(url, headers=legacy_service_jwt, json={"amount": -1250, "reason": "fraud"})
    assert taken.json()["balance"] == 0

    below = await client.post(url, headers=SERVICE, json={"amount": -1, "reason": "too far"})
    assert below.status_code == 402
    assert below.json()["balance"] == 0
    assert await mismatches(engine) == []


async def test_adjustment_needs_the_service_role(
    client: httpx.AsyncClient, member: dict[str, str], user_id: uuid.UUID
) -> None:
    url = f"/admin/profiles/{user_id}/credits"
    body = {"amount": 1_000_000, "reason": "free money"}
    assert (await client.post(url, headers=member, json=body)).status_code == 403
    assert (await client.post(url, json=body)).status_code == 401
    assert (await client.get("/profile", headers=member)).json()["credits"] == 1000


@pytest.mark.parametrize(
    "body", [{"amount": 0, "reason": "x"}, {"amount": 5}, {"amount": 5, "reason": ""}, {"amount": 1.5, "reason": "x"}]
)
async def test_invalid_adjustment_is_422(
    client: httpx.AsyncClient, member: dict[str, str], user_id: uuid.UUID, body: dict[str, Any]
) -> None:
    response = await client.post(f"/admin/profiles/{user_id}/credits", headers=SERVICE, json=body)
    assert response.status_code == 422


async def test_adjusting_an_unknown_user_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(
        f"/admin/profiles/{uuid.uuid4()}/credits", headers=SERVICE, json={"amount": 5, "reason": "x"}
    )
    assert response.status_code == 404
    bad_id = await client.post("/admin/profiles/not-a-uuid/credits", headers=SERVICE, json={"amount": 5, "reason": "x"})
    assert bad_id.status_code == 422


async def test_mismatch_is_reported(
    client: httpx.AsyncClient, member: dict[str, str], user_id: uuid.UUID, engine: AsyncEngine
) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE profiles SET credits = credits + 5 WHERE id = :id"), {"id": user_id})
    found = await mismatches(engine)
    assert [(m.profile_id, m.balance, m.ledger_sum) for m in found] == [(user_id, 1005, 1000)]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/credits/spend", b'{"amount": 1, "reason": "a\\ud800"}'),
        ("/profile", b'{"full_name": "Ada \\udfff"}'),
    ],
)
async def test_unpaired_surrogates_are_422(
    client: httpx.AsyncClient, member: dict[str, str], path: str, body: bytes
) -> None:
    response = await client.post(path, headers={**member, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 422
    assert "unpaired surrogates" in str(response.json()["detail"])


async def test_invisible_characters_in_a_reason_are_422(client: httpx.AsyncClient, member: dict[str, str]) -> None:
    response = await client.post("/credits/spend", headers=member, json={"amount": 1, "reason": "refund\u202e"})
    assert response.status_code == 422
    assert "must not contain U+202E" in str(response.json()["detail"])


async def test_a_cursor_beyond_any_entry_id_is_422(client: httpx.AsyncClient, member: dict[str, str]) -> None:
    response = await client.get("/credits/transactions", headers=member, params={"before": 10**20})
    assert response.status_code == 422


async def test_refused_requests_keep_their_database_connection(
    client: httpx.AsyncClient, member: dict[str, str], engine: AsyncEngine
) -> None:
    """A 422 or a 402 is our answer, not a broken connection: no new connection is opened for the next one."""

    async def sessions_opened() -> int:
        async with engine.connect() as connection:
            count = await connection.scalar(
                text("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
            )
        return int(count or 0)

    await client.post("/credits/spend", headers=member, json={"amount": 1})
    before = await sessions_opened()
    for body in ({"amount": 0}, {"amount": 10**6}, {"amount": "x"}):
        for _ in range(3):
            assert (await client.post("/credits/spend", headers=member, json=body)).status_code in (402, 422)
    assert await sessions_opened() == before


async def test_with_every_connection_taken_a_request_waits_at_most_the_pool_timeout(
    database_url: URL, tmp_path: Path, engine: AsyncEngine, token: TokenFactory, user_id: uuid.UUID
) -> None:
    """A spend stuck on a row lock holds the only hot-path connection: the next request gets a 503 after
    DB_POOL_TIMEOUT, and once the lock goes, both the spend and later requests go through."""
    application = create_app(make_settings(database_url, tmp_path, db_pool_size=1, db_pool_timeout=0.5))
    user = bearer(token(user_id))
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://testserver") as http,
    ):
        assert (await http.post("/profile", headers=user)).status_code == 201
        async with engine.begin() as locker:
            await locker.execute(text("SELECT 1 FROM profiles WHERE id = :id FOR UPDATE"), {"id": user_id})
            spend = asyncio.create_task(http.post("/credits/spend", headers=user, json={"amount": 1}))
            await asyncio.sleep(0.3)  # the spend now waits for the lock, on the pool's only connection
            started = time.monotonic()
            waiting = await http.get("/profile", headers=user)
            assert waiting.status_code == 503
            assert waiting.headers["Retry-After"]
            assert 0.4 < time.monotonic() - started < 3
        assert (await spend).status_code == 200
        reads = await asyncio.gather(*(http.get("/profile", headers=user) for _ in range(5)))
        assert [read.status_code for read in reads] == [200] * 5
        assert reads[0].json()["credits"] == 999


async def test_an_adjustment_retried_twenty_times_at_once_with_one_key_is_one_entry(
    client: httpx.AsyncClient, member: dict[str, str], user_id: uuid.UUID, engine: AsyncEngine
) -> None:
    """A support tool that retries never grants twice: the same key and body get the first answer."""
    headers = {**SERVICE, "Idempotency-Key": "ticket-123"}
    body = {"amount": 250, "reason": "support: failed generation"}
    answers = await asyncio.gather(
        *(client.post(f"/admin/profiles/{user_id}/credits", headers=headers, json=body) for _ in range(20))
    )
    assert {answer.status_code for answer in answers} == {200}
    assert len({answer.json()["entry"]["id"] for answer in answers}) == 1
    assert (await client.get("/profile", headers=member)).json()["credits"] == 1250
    other = await client.post(f"/admin/profiles/{user_id}/credits", headers=headers, json={**body, "amount": 300})
    assert other.status_code == 409
    async with engine.connect() as connection:
        count = await connection.scalar(text("SELECT count(*) FROM credit_entries WHERE kind = 'adjustment'"))
    assert count == 1
    assert await mismatches(engine) == []


async def test_one_user_flooding_their_own_balance_takes_a_small_share_of_the_pool(
    database_url: URL, tmp_path: Path, token: TokenFactory, engine: AsyncEngine
) -> None:
    """150 keyed spends at once from one account: beyond a few at a time they are 429 (retryable), so they never
    hold more than that many of the shared connections, and another user's requests all go through."""
    application = create_app(make_settings(database_url, tmp_path, user_concurrent_writes=3))
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://testserver") as client,
    ):
        await flood_and_watch(client, token, engine)


async def flood_and_watch(client: httpx.AsyncClient, token: TokenFactory, engine: AsyncEngine) -> None:
    member, other = bearer(token(uuid.uuid4())), bearer(token(uuid.uuid4()))
    for headers in (member, other):
        assert (await client.post("/profile", headers=headers)).status_code == 201

    async def flood(index: int) -> httpx.Response:
        headers = {**member, "Idempotency-Key": f"flood-{index}"}
        return await client.post("/credits/spend", headers=headers, json={"amount": 1})

    answers = await asyncio.gather(
        *(flood(index) for index in range(150)), *(client.get("/profile", headers=other) for _ in range(30))
    )
    flooded, others = answers[:150], answers[150:]
    statuses = [answer.status_code for answer in flooded]
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) > 0
    busy = next(answer for answer in flooded if answer.status_code == 429)
    assert busy.headers["retry-after"] == "1"
    assert "try again" in busy.json()["detail"]
    assert {answer.status_code for answer in others} == {200}
    assert (await client.get("/profile", headers=member)).json()["credits"] == 1000 - statuses.count(200)
    assert await mismatches(engine) == []


async def test_a_request_waiting_long_on_a_balance_lock_is_429_and_writes_nothing(
    database_url: URL, tmp_path: Path, engine: AsyncEngine, token: TokenFactory, user_id: uuid.UUID
) -> None:
    """Another transaction holds the user's row: their spend gives up after DB_LOCK_TIMEOUT_MS (not the pool
    timeout), gives its connection back, and everyone else's spends go on."""
    application = create_app(make_settings(database_url, tmp_path, db_lock_timeout_ms=300, db_pool_size=2))
    locked, free = bearer(token(user_id)), bearer(token(uuid.uuid4()))
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://testserver") as http,
    ):
        for headers in (locked, free):
            assert (await http.post("/profile", headers=headers)).status_code == 201
        async with engine.begin() as locker:
            await locker.execute(text("SELECT 1 FROM profiles WHERE id = :id FOR UPDATE"), {"id": user_id})
            started = time.monotonic()
            waited = await http.post("/credits/spend", headers=locked, json={"amount": 5})
            assert time.monotonic() - started < 2
            assert waited.status_code == 429
            assert waited.json()["detail"].startswith("this balance is busy")
            others = await asyncio.gather(
                *(http.post("/credits/spend", headers=free, json={"amount": 1}) for _ in range(10))
            )
            assert {answer.status_code for answer in others} == {200}
        assert (await http.get("/profile", headers=locked)).json()["credits"] == 1000  # nothing written
    assert await mismatches(engine) == []
