"""Money that goes back: refunds and disputes take their credits back (leaving a balance that owes, when they were
spent), each once, in any order of delivery; later grants repay the debt."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.fake_stripe import PACK, PLAN, FakeStripe
from tests.stripe_payloads import (
    Purchase,
    assert_ledger_consistent,
    charge,
    completed,
    deliver,
    dispute,
    entries,
    event,
    outcomes,
    paid_invoice,
    purchase,
    subscription,
)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
PAID = 900  # the pack's price, in cents


@pytest.fixture
async def pack(billing: httpx.AsyncClient, fake_stripe: FakeStripe, auth: dict[str, str]) -> Purchase:
    """A 500-credit pack bought for 9.00 and granted (the user also has the 1000 signup credits)."""
    bought = await purchase(billing, fake_stripe, auth, PACK)
    granted = await deliver(billing, event("checkout.session.completed", completed(fake_stripe, bought)))
    assert granted.json()["outcome"] == "granted 500 credits"
    return bought


def pi(bought: Purchase) -> str:
    return f"pi_{bought.session_id}"


def refunded(bought: Purchase, amount: int) -> dict[str, Any]:
    return event("charge.refunded", charge(pi(bought), PAID, refunded=amount))


async def balance(billing: httpx.AsyncClient, headers: dict[str, str]) -> int:
    return int((await billing.get("/profile", headers=headers)).json()["credits"])


async def spend(billing: httpx.AsyncClient, headers: dict[str, str], amount: int) -> httpx.Response:
    return await billing.post("/credits/spend", headers=headers, json={"amount": amount})


async def test_a_refunded_pack_already_spent_leaves_a_balance_that_owes(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, engine: AsyncEngine, auth: dict[str, str], pack: Purchase
) -> None:
    assert (await spend(billing, auth, 1250)).status_code == 200  # the signup credits and half the pack
    assert await balance(billing, auth) == 250
    taken = await deliver(billing, refunded(pack, PAID))
    assert taken.json()["outcome"] == f"took back 500 credits: refunded {PAID} of {PAID}"
    assert await balance(billing, auth) == -250
    refused = await spend(billing, auth, 1)
    assert refused.status_code == 402
    assert refused.json() == {
        "detail": "not enough credits: -250 available, 1 requested",
        "balance": -250,
        "held": 0,
        "available": -250,
        "requested": 1,
    }
    history = (await billing.get("/credits/transactions", headers=auth)).json()["entries"]
    assert (history[0]["kind"], history[0]["amount"], history[0]["balance_after"]) == ("refund", -500, -250)
    assert history[0]["reference"] == f"ch_{pi(pack)}"
    # The next purchase repays the debt first, simply by adding to the balance.
    again = await purchase(billing, fake_stripe, auth, PACK)
    await deliver(billing, event("checkout.session.completed", completed(fake_stripe, again)))
    assert await balance(billing, auth) == 250
    assert (await spend(billing, auth, 250)).status_code == 200
    await assert_ledger_consistent(engine)


async def test_partial_refunds_take_their_share_and_never_more_than_was_granted(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], pack: Purchase
) -> None:
    for refunded_so_far, outcome in (
        (270, "took back 150 credits"),
        (540, "took back 150 credits"),
        (PAID, "took back 200 credits"),
    ):
        answer = await deliver(billing, refunded(pack, refunded_so_far))
        assert answer.json()["outcome"].startswith(outcome)
    assert await balance(billing, auth) == 1000
    again = await deliver(billing, refunded(pack, PAID))  # another event about the same full refund
    assert again.json()["outcome"] == "nothing more to take back"
    refunds = await entries(engine, pack.user_id, "refund")
    assert [amount for _, amount, _ in refunds] == [-150, -150, -200]
    await assert_ledger_consistent(engine)


@pytest.mark.parametrize(("closed", "returned"), [("won", True), ("warning_closed", True), ("lost", False)])
async def test_a_dispute_takes_its_share_while_open_and_gives_it_back_unless_lost(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], pack: Purchase, closed: str, returned: bool
) -> None:
    opened = await deliver(billing, event("charge.dispute.created", dispute("dp_1", pi(pack), PAID, "needs_response")))
    assert opened.json()["outcome"] == "took back 500 credits while the dispute is open"
    assert await balance(billing, auth) == 1000
    ended = await deliver(billing, event("charge.dispute.closed", dispute("dp_1", pi(pack), PAID, closed)))
    assert ended.status_code == 200
    assert await balance(billing, auth) == (1500 if returned else 1000)
    # Each phase acts once: a second closing event changes nothing.
    assert (
        (await deliver(billing, event("charge.dispute.closed", dispute("dp_1", pi(pack), PAID, closed))))
        .json()["outcome"]
        .startswith("dispute already closed")
    )
    kinds = [kind for kind, _, _ in await entries(engine, pack.user_id, "dispute", "dispute_reversal")]
    assert kinds == (["dispute", "dispute_reversal"] if returned else ["dispute"])
    await assert_ledger_consistent(engine)


async def test_a_refund_and_a_dispute_together_never_take_more_than_was_granted(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], pack: Purchase
) -> None:
    await deliver(billing, refunded(pack, 450))  # half: 250 credits
    await deliver(billing, event("charge.dispute.created", dispute("dp_2", pi(pack), PAID, "needs_response")))
    await deliver(billing, refunded(pack, PAID))
    assert await balance(billing, auth) == 1000
    taken = sum(amount for _, amount, _ in await entries(engine, pack.user_id, "refund", "dispute"))
    assert taken == -500


async def test_each_event_twice_and_in_reverse_order_with_the_grant_ends_in_the_same_ledger(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, engine: AsyncEngine, auth: dict[str, str]
) -> None:
    """Stripe does not promise order: an event undoing a grant not recorded yet is answered 503 (nothing written),
    and Stripe's retry after the grant applies it. Same end state in every order."""
    bought = await purchase(billing, fake_stripe, auth, PACK)
    grant = event("checkout.session.completed", completed(fake_stripe, bought))
    partial = refunded(bought, 300)
    opened = event("charge.dispute.created", dispute("dp_3", pi(bought), 300, "needs_response"))
    won = event("charge.dispute.closed", dispute("dp_3", pi(bought), 300, "won"))
    reversed_order = [won, opened, partial, grant]
    answers = []
    for payload in reversed_order * 2:
        answers.append((await deliver(billing, payload)).status_code)
    assert answers[:3] == [503, 503, 503]  # before the grant
    for payload in reversed_order:  # Stripe's retries
        assert (await deliver(billing, payload)).status_code == 200
    ledger = await entries(engine, bought.user_id, "purchase", "refund", "dispute", "dispute_reversal")
    assert sorted((kind, amount) for kind, amount, _ in ledger) == [
        ("dispute", -167),
        ("dispute_reversal", 167),
        ("purchase", 500),
        ("refund", -167),
    ]
    assert await balance(billing, auth) == 1000 + 500 - 167
    await assert_ledger_consistent(engine)


async def test_spends_racing_a_refund_keep_the_ledger_whole(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], pack: Purchase
) -> None:
    results = await asyncio.gather(
        *(spend(billing, auth, 100) for _ in range(20)), deliver(billing, refunded(pack, PAID))
    )
    statuses = [result.status_code for result in results]
    assert statuses[-1] == 200
    assert set(statuses[:-1]) <= {200, 402}
    spent = 100 * statuses[:-1].count(200)
    assert await balance(billing, auth) == 1500 - spent - 500
    await assert_ledger_consistent(engine)


async def test_a_subscription_invoice_refund_takes_back_that_invoices_grant(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, engine: AsyncEngine, auth: dict[str, str]
) -> None:
    plan = await purchase(billing, fake_stripe, auth, PLAN)
    fake_stripe.holds(subscription(plan, status="active", period_end=2_000_000_000))
    await deliver(
        billing, event("invoice.paid", paid_invoice(fake_stripe, "in_test_1", plan, payment_intent="pi_inv1"))
    )
    await deliver(
        billing, event("invoice.paid", paid_invoice(fake_stripe, "in_test_2", plan, payment_intent="pi_inv2"))
    )
    taken = await deliver(billing, event("charge.refunded", charge("pi_inv2", 1900, refunded=950)))
    assert taken.json()["outcome"].startswith("took back 1000 credits")
    assert await balance(billing, auth) == 1000 + 4000 - 1000
    await assert_ledger_consistent(engine)


async def test_a_grant_from_before_payments_were_recorded_is_found_through_stripe(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, engine: AsyncEngine, auth: dict[str, str], pack: Purchase
) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("DELETE FROM stripe_payments"))  # as a grant made by the previous version
    taken = await deliver(billing, refunded(pack, PAID))
    assert taken.json()["outcome"].startswith("took back 500 credits")
    asked = [request.path for request in fake_stripe.requests if request.method == "GET"]
    assert asked == ["/v1/checkout/sessions"]  # which checkout this payment paid for
    assert await balance(billing, auth) == 1000
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT grant_reference FROM stripe_payments")) == pack.session_id


async def test_a_refund_of_a_payment_we_never_granted_for_is_recorded_as_ignored(
    billing: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    answer = await deliver(billing, event("charge.refunded", charge("pi_not_ours", 1000, refunded=1000)))
    assert answer.status_code == 200
    assert answer.json()["outcome"] == "ignored: payment pi_not_ours did not pay for anything this service sold"
    assert await outcomes(engine) == [answer.json()["outcome"]]


async def test_a_hold_taken_before_a_take_back_is_still_captured(
    billing: httpx.AsyncClient, engine: AsyncEngine, auth: dict[str, str], pack: Purchase
) -> None:
    """The credits were reserved: the capture succeeds, and the balance owes what the take-back left."""
    held = (await billing.post("/credits/holds", headers=auth, json={"amount": 1200})).json()["hold"]["id"]
    await deliver(billing, refunded(pack, PAID))
    captured = await billing.post(f"/credits/holds/{held}/capture", headers=auth)
    assert captured.status_code == 200
    assert captured.json()["balance"] == {"credits": -200, "held": 0, "available": -200}
    await assert_ledger_consistent(engine)


async def test_refund_entries_are_only_the_users_own(
    billing: httpx.AsyncClient, auth: dict[str, str], pack: Purchase, token: Any
) -> None:
    await deliver(billing, refunded(pack, PAID))
    stranger = {"Authorization": f"Bearer {token(uuid.uuid4())}"}
    assert (await billing.post("/profile", headers=stranger)).status_code == 201
    kinds = {
        entry["kind"] for entry in (await billing.get("/credits/transactions", headers=stranger)).json()["entries"]
    }
    assert kinds == {"signup_grant"}
