"""Stripe state you can trust: the subscription read from Stripe's API whatever order events come in, missed
events recovered by reconciliation (the command and the service), one event replayed on request."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from app.services.billing.reconcile import reconcile
from tests.conftest import TEST_SERVICE_ROLE_KEY, TokenFactory, bearer
from tests.fake_stripe import CATALOGUE, PACK, PLAN, SECRET_KEY, FakeStripe
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
    stripe_events,
    subscription,
)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
SERVICE = bearer(TEST_SERVICE_ROLE_KEY)
PERIOD_END = int(time.time()) + 14 * 86400


def a_subscription_life(fake: FakeStripe, bought: Purchase) -> list[dict[str, Any]]:
    """The four events of a new subscription; Stripe's state by now: trialing, ending at PERIOD_END."""
    fake.holds(subscription(bought, status="trialing", period_end=PERIOD_END, cancel_at_period_end=True))
    start = int(time.time()) - 60
    return [
        event("checkout.session.completed", completed(fake, bought, subscription_id="sub_test_pro"), start),
        event("customer.subscription.created", subscription(bought, status="incomplete", period_end=start), start),
        event("customer.subscription.updated", subscription(bought, status="active", period_end=start), start + 1),
        event("invoice.paid", paid_invoice(fake, "in_test_first", bought), start + 1),
    ]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))), ids=lambda order: "".join(map(str, order)))
async def test_every_order_of_events_ends_in_stripes_state(
    billing: httpx.AsyncClient,
    fake_stripe: FakeStripe,
    engine: AsyncEngine,
    token: TokenFactory,
    order: tuple[int, ...],
) -> None:
    headers = bearer(token(uuid.uuid4()))
    bought = await purchase(billing, fake_stripe, headers, PLAN)
    life = a_subscription_life(fake_stripe, bought)
    for index in order:
        assert (await deliver(billing, life[index])).status_code == 200
    profile = (await billing.get("/profile", headers=headers)).json()
    assert profile["subscription_status"] == "trialing"  # Stripe's, not the last event's
    assert profile["subscription_price_id"] == PLAN
    assert profile["subscription_cancel_at_period_end"] is True
    assert datetime.fromisoformat(profile["subscription_current_period_end"]).timestamp() == PERIOD_END
    assert profile["credits"] == 1000 + 2000
    await assert_ledger_consistent(engine)


async def test_stripe_unreachable_during_an_event_is_503_and_the_retry_succeeds(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, engine: AsyncEngine, auth: dict[str, str]
) -> None:
    bought = await purchase(billing, fake_stripe, auth, PLAN)
    fake_stripe.holds(subscription(bought, status="active", period_end=PERIOD_END))
    paid = event("invoice.paid", paid_invoice(fake_stripe, "in_test_first", bought))
    fake_stripe.failure = (500, {"error": {"type": "api_error", "message": "Stripe is having a bad day"}})
    down = await deliver(billing, paid)
    assert down.status_code == 503
    assert down.headers["retry-after"]
    assert "nothing was changed" in down.json()["detail"]
    assert await stripe_events(engine) == []  # nothing half-written: Stripe's retry is processed normally
    assert await grants(engine, bought.user_id) == []
    fake_stripe.failure = None
    retried = await deliver(billing, paid)
    assert retried.json()["outcome"] == "granted 2000 credits; subscription sub_test_pro is active"


async def missed_events(billing: httpx.AsyncClient, fake: FakeStripe, auth: dict[str, str]) -> list[dict[str, Any]]:
    """A pack and a plan bought while the webhook endpoint was down: Stripe has the events, we saw none."""
    pack = await purchase(billing, fake, auth, PACK)
    plan = await purchase(billing, fake, auth, PLAN)
    fake.holds(subscription(plan, status="active", period_end=PERIOD_END))
    now = int(time.time())
    fake.events.extend(
        [
            event("checkout.session.completed", completed(fake, pack), now - 3000),
            event("checkout.session.completed", completed(fake, plan, subscription_id="sub_test_pro"), now - 2000),
            event("invoice.paid", paid_invoice(fake, "in_test_first", plan), now - 1990),
            event("customer.created", {"id": "cus_x", "object": "customer"}, now - 1000),  # not a handled type
        ]
    )
    return fake.events


async def run_reconcile(app: FastAPI, *, dry_run: bool = False) -> Any:
    resources = app.state.resources
    since = datetime.now(UTC) - timedelta(days=3)
    assert resources.stripe is not None
    return await reconcile(
        resources.sessions, resources.stripe.client, resources.settings.catalogue, since, dry_run=dry_run
    )


async def test_reconciliation_processes_each_missed_event_once(
    billing: httpx.AsyncClient,
    billing_app: FastAPI,
    fake_stripe: FakeStripe,
    engine: AsyncEngine,
    auth: dict[str, str],
    user_id: uuid.UUID,
) -> None:
    await missed_events(billing, fake_stripe, auth)
    preview = await run_reconcile(billing_app, dry_run=True)
    assert dict(preview.counts) == {"missing": 3}
    assert await stripe_events(engine) == []
    first = await run_reconcile(billing_app)
    assert dict(first.counts) == {"processed": 3}
    assert not first.failed
    assert sorted(await grants(engine, user_id)) == [
        ("purchase", 500, fake_stripe.events[0]["data"]["object"]["id"]),
        ("subscription_grant", 2000, "in_test_first"),
    ]
    again = await run_reconcile(billing_app)
    assert dict(again.counts) == {"already seen": 3}
    assert (await billing.get("/profile", headers=auth)).json()["credits"] == 1000 + 500 + 2000
    await assert_ledger_consistent(engine)


async def test_reconciliation_and_live_webhooks_at_once_still_grant_once(
    billing: httpx.AsyncClient,
    billing_app: FastAPI,
    fake_stripe: FakeStripe,
    engine: AsyncEngine,
    auth: dict[str, str],
    user_id: uuid.UUID,
) -> None:
    missed = await missed_events(billing, fake_stripe, auth)
    await asyncio.gather(
        run_reconcile(billing_app),
        run_reconcile(billing_app),
        *(deliver(billing, payload) for payload in missed[:3] * 2),
    )
    assert len(await grants(engine, user_id)) == 2
    assert len(await stripe_events(engine)) == 3
    assert (await billing.get("/profile", headers=auth)).json()["credits"] == 1000 + 500 + 2000
    await assert_ledger_consistent(engine)


async def test_a_failure_is_counted_and_named_and_the_run_goes_on(
    billing: httpx.AsyncClient, billing_app: FastAPI, fake_stripe: FakeStripe, auth: dict[str, str]
) -> None:
    missed = await missed_events(billing, fake_stripe, auth)
    fake_stripe.failure, fake_stripe.fail_path = (500, {"error": {"type": "api_error"}}), "/v1/invoices/in_test_first"
    report = await run_reconcile(billing_app)
    assert dict(report.counts) == {"processed": 2, "failed": 1}
    assert report.failures == [
        f"{missed[2]['id']} (invoice.paid): "
        + "Stripe's API could not be reached: nothing was changed, try again later"
    ]


def reconcile_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("stripe-reconcile")), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


async def test_the_command_reports_what_it_did_and_exits_by_it(
    billing: httpx.AsyncClient,
    fake_stripe: FakeStripe,
    database_url: URL,
    tmp_path: Path,
    engine: AsyncEngine,
    auth: dict[str, str],
) -> None:
    await missed_events(billing, fake_stripe, auth)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DB_", "DATABASE", "STRIPE_"))}
    env.update(
        {
            "ENVIRONMENT": "test",
            "DATABASE_URL": database_url.render_as_string(hide_password=False),
            "STRIPE_SECRET_KEY": SECRET_KEY,
            "STRIPE_API_BASE": fake_stripe.url,
            "STRIPE_MAX_NETWORK_RETRIES": "0",
            "DATA_DIR": str(tmp_path),
            "SUBSCRIPTION_PLANS": str(CATALOGUE["subscription_plans"]).replace("'", '"'),
            "CREDIT_PACKS": str(CATALOGUE["credit_packs"]).replace("'", '"'),
        }
    )
    too_far = reconcile_command(env, "--since", "40d")
    assert too_far.returncode == 2
    assert "Stripe keeps events for 30 days" in too_far.stderr
    dry = await asyncio.to_thread(reconcile_command, env, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "missing      3" in dry.stdout
    done = await asyncio.to_thread(reconcile_command, env, "--since", "2d")
    assert done.returncode == 0, done.stderr
    assert "processed    3" in done.stdout
    assert "failed       0" in done.stdout
    fake_stripe.events.append(event("invoice.paid", paid_invoice(fake_stripe, "in_test_gone", None), int(time.time())))
    fake_stripe.failure, fake_stripe.fail_path = (500, {"error": {"type": "api_error"}}), "/v1/invoices/in_test_gone"
    failing = await asyncio.to_thread(reconcile_command, env)
    assert failing.returncode == 1
    assert "failed: evt_" in failing.stdout
    assert len(await stripe_events(engine)) == 3


async def test_one_event_replayed_on_request(
    billing: httpx.AsyncClient, fake_stripe: FakeStripe, engine: AsyncEngine, auth: dict[str, str], user_id: uuid.UUID
) -> None:
    missed = await missed_events(billing, fake_stripe, auth)
    pack_event = missed[0]["id"]
    replayed = await billing.post(f"/admin/stripe/events/{pack_event}/replay", headers=SERVICE)
    assert replayed.status_code == 200
    assert replayed.json() == {
        "event_id": pack_event,
        "type": "checkout.session.completed",
        "duplicate": False,
        "outcome": "granted 500 credits",
    }
    again = await billing.post(f"/admin/stripe/events/{pack_event}/replay", headers=SERVICE)
    assert again.json()["duplicate"] is True
    assert len(await grants(engine, user_id)) == 1
    assert (await billing.post("/admin/stripe/events/evt_unknown/replay", headers=SERVICE)).status_code == 404
    assert (await billing.post(f"/admin/stripe/events/{pack_event}/replay", headers=auth)).status_code == 403
    assert await outcomes(engine) == ["granted 500 credits"]
