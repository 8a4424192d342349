"""Prometheus metrics: off by default, protected when on, and right when gunicorn's workers add them up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import URL

from app.application import create_app
from app.config import load_settings
from tests.conftest import (
    PROJECT_ROOT,
    TEST_JWT_SECRET,
    TEST_SERVICE_ROLE_KEY,
    TokenFactory,
    bearer,
    free_port,
    make_settings,
    wait_for_http,
)
from tests.fake_stripe import CATALOGUE, FRONTEND, PACK, SECRET_KEY, WEBHOOK_SECRET, FakeStripe
from tests.stripe_payloads import completed, event, purchase, signed

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

METRICS_TOKEN = "metrics-token-for-the-tests-0123456789"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels, read with prometheus-client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_of(samples: Samples, method: str, route: str, status: int) -> float:
    labels = {"method": method, "route": route, "status": str(status)}
    return value(samples, "picads_http_request_duration_seconds_count", **labels)


# --- Off, protected, and served by one process -------------------------------------------------------------------


async def test_metrics_are_off_unless_enabled(client: httpx.AsyncClient) -> None:
    assert (await client.get("/metrics")).status_code == 404


def test_production_refuses_metrics_nobody_protects() -> None:
    production = {"environment": "production", "database_url": "postgresql://u:p@db/x", "supabase_url": "https://x"}
    with pytest.raises(SystemExit) as refused:
        load_settings(_env_file=None, metrics_enabled=True, **production)
    assert str(refused.value) == (
        "Configuration error: METRICS_ENABLED=true in production needs METRICS_TOKEN or METRICS_PORT: "
        "/metrics would be public"
    )
    everywhere = "0.0.0.0"  # noqa: S104 - what is refused
    with pytest.raises(SystemExit, match=r"METRICS_HOST=0\.0\.0\.0 would serve METRICS_PORT"):
        load_settings(_env_file=None, metrics_enabled=True, metrics_port=9100, metrics_host=everywhere, **production)
    with pytest.raises(SystemExit, match="METRICS_TOKEN: must be at least 16 characters"):
        load_settings(_env_file=None, metrics_enabled=True, metrics_token="short", **production)
    assert load_settings(_env_file=None, metrics_enabled=True, metrics_token=METRICS_TOKEN, **production)
    assert load_settings(_env_file=None, metrics_enabled=True, metrics_port=9100, **production)


@contextlib.asynccontextmanager
async def serving(database_url: URL, tmp_path: Path, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    application: FastAPI = create_app(make_settings(database_url, tmp_path, metrics_enabled=True, **settings))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


async def test_metrics_need_the_token(app: FastAPI, database_url: URL, tmp_path: Path, auth: dict[str, str]) -> None:
    async with serving(database_url, tmp_path, metrics_token=METRICS_TOKEN) as http:
        missing = await http.get("/metrics")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/metrics", headers=bearer("wrong-token-wrong-token"))).status_code == 401
        assert (await http.get("/metrics", headers=auth)).status_code == 401  # a user's token is not it either
        assert (await http.post("/profile", headers=auth)).status_code == 201
        before = parse((await http.get("/metrics", headers=bearer(METRICS_TOKEN))).text)
        for _ in range(3):
            assert (await http.get("/profile", headers=auth)).status_code == 200
        scraped = await http.get("/metrics", headers=bearer(METRICS_TOKEN))
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = parse(scraped.text)
    assert requests_of(after, "GET", "/profile", 200) - requests_of(before, "GET", "/profile", 200) == 3


async def test_metrics_port_serves_them_apart(app: FastAPI, database_url: URL, tmp_path: Path) -> None:
    """With METRICS_PORT alone, the metrics are on that port (no token) and not on the API's."""
    port = free_port()
    async with serving(database_url, tmp_path, metrics_port=port) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/metrics")).status_code == 404
        async with httpx.AsyncClient() as scraper:
            scraped = await scraper.get(f"http://127.0.0.1:{port}/metrics")
    assert scraped.status_code == 200
    assert requests_of(parse(scraped.text), "GET", "/health", 200) >= 1
    with pytest.raises(httpx.ConnectError):  # closed with the app
        async with httpx.AsyncClient() as scraper:
            await scraper.get(f"http://127.0.0.1:{port}/metrics")


# --- gunicorn, two workers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def gunicorn(env: dict[str, str], cwd: Path, *arguments: str) -> Iterator[Any]:
    """gunicorn as production runs it, in its own process group, stopped (all of it) at the end."""
    import subprocess

    log = (cwd / "gunicorn.log").open("wb")
    command = [sys.executable, "-m", "gunicorn", "main:app", *arguments]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            log.close()


def _server_env(database_url: URL, tmp_path: Path, fake_stripe: FakeStripe) -> dict[str, str]:
    ours = ("DB_", "DATABASE", "SUPABASE_", "STRIPE_", "METRICS_", "PROMETHEUS_", "SENTRY_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(ours)}
    env.update(
        {
            "ENVIRONMENT": "production",
            "DATABASE_URL": database_url.render_as_string(hide_password=False),
            "SUPABASE_JWT_SECRET": TEST_JWT_SECRET,
            "SUPABASE_SERVICE_ROLE_KEY": TEST_SERVICE_ROLE_KEY,
            "STRIPE_SECRET_KEY": SECRET_KEY,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STRIPE_API_BASE": fake_stripe.url,
            "STRIPE_MAX_NETWORK_RETRIES": "0",
            "FRONTEND_URL": FRONTEND,
            "CREDIT_PACKS": json.dumps(CATALOGUE["credit_packs"]),
            "SUBSCRIPTION_PLANS": json.dumps(CATALOGUE["subscription_plans"]),
            "USER_CONCURRENT_WRITES": "1000",
            "LOG_FORMAT": "json",
            "DATA_DIR": str(tmp_path / "data"),
            "PYTHONPATH": str(PROJECT_ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


async def _until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_two_gunicorn_workers_add_up(
    app: FastAPI, database_url: URL, tmp_path: Path, fake_stripe: FakeStripe, token: TokenFactory
) -> None:
    """A known sequence of requests and webhook events, served by two workers: every counter is the sum of both
    (on the API's port with the token, and from the master on METRICS_PORT), and stays so when a worker dies."""
    port, metrics_port, folder = free_port(), free_port(), tmp_path / "metrics"
    env = _server_env(database_url, tmp_path, fake_stripe)
    env.update(
        METRICS_ENABLED="true",
        METRICS_TOKEN=METRICS_TOKEN,
        METRICS_PORT=str(metrics_port),
        PROMETHEUS_MULTIPROC_DIR=str(folder),
    )
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"left from an earlier run")  # emptied at start
    base = f"http://127.0.0.1:{port}"
    arguments = ["--config", "python:app.gunicorn_conf", "--worker-class", "uvicorn_worker.UvicornWorker"]
    arguments += ["--bind", f"127.0.0.1:{port}", "--workers", "2", "--graceful-timeout", "5"]
    with gunicorn(env, tmp_path, *arguments):
        assert (await wait_for_http(f"{base}/health", 60)).status_code == 200
        assert not (folder / "counter_1.db").exists()
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            sent = await _known_sequence(http, fake_stripe, token, folder)

            scrape = await http.get("/metrics", headers=bearer(METRICS_TOKEN))
            assert scrape.status_code == 200
            samples = parse(scrape.text)
            _assert_counts(samples, sent)
            _assert_counts(parse((await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text), sent)

            # A worker dies: its counts stay (its files do), its live gauges go (child_exit), a new one starts.
            workers = {int(path.stem.split("_")[-1]) for path in folder.glob("histogram_*.db")}
            gone = workers.pop()
            os.kill(gone, signal.SIGTERM)
            await _until(lambda: not (folder / f"gauge_livesum_{gone}.db").exists(), 20, "child_exit")
            await _until(lambda: len(list(folder.glob("gauge_livesum_*.db"))) >= 2, 30, "a new worker")
            await asyncio.sleep(1.5)  # the new worker's first samples
            after = parse((await http.get("/metrics", headers=bearer(METRICS_TOKEN))).text)
            _assert_counts(after, sent)
    output = (tmp_path / "gunicorn.log").read_text()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    (granted,) = [line for line in lines if "granted 500 credits" in line["message"]]
    assert granted["request_id"] == "delivery-1"  # a line of the webhook's own, not only the request's line
    assert "Traceback" not in output


async def _known_sequence(
    http: httpx.AsyncClient, fake_stripe: FakeStripe, token: TokenFactory, folder: Path
) -> dict[str, Any]:
    # Until both workers have served: each worker's histogram file appears with its first request.
    health = 0
    while len(await asyncio.to_thread(lambda: list(folder.glob("histogram_*.db")))) < 2:
        assert health < 400, "one worker served everything"
        answers = await asyncio.gather(*(http.get("/health", headers={"Connection": "close"}) for _ in range(20)))
        assert all(answer.status_code == 200 for answer in answers)
        health += len(answers)

    users = [bearer(token(uuid.uuid4())) for _ in range(3)]
    for user in users:
        assert (await http.post("/profile", headers=user)).status_code == 201
    profiles = await asyncio.gather(*(http.get("/profile", headers=users[0]) for _ in range(10)))
    assert [answer.status_code for answer in profiles] == [200] * 10
    for _ in range(2):
        assert (await http.get("/profile", headers=bearer(token(uuid.uuid4())))).status_code == 404
    assert (await http.get(f"/nothing/{uuid.uuid4()}")).status_code == 404

    bought = await purchase(http, fake_stripe, users[0], PACK)
    delivery = event("checkout.session.completed", completed(fake_stripe, bought, payment_intent="pi_metrics"))
    request = signed(delivery)
    first = await http.post(
        "/webhook", content=request["content"], headers={**request["headers"], "X-Request-ID": "delivery-1"}
    )
    assert first.json()["outcome"] == "granted 500 credits"
    assert (await http.post("/webhook", **request)).json()["duplicate"] is True
    assert (await http.post("/webhook", **signed(delivery, secret="whsec_not_ours"))).status_code == 400
    assert (await http.post("/webhook", **signed(event("customer.created", {})))).status_code == 200

    assert (await http.post("/credits/spend", headers=users[0], json={"amount": 30})).status_code == 200
    hold = await http.post("/credits/holds", headers=users[0], json={"amount": 40})
    hold_id = hold.json()["hold"]["id"]
    capture = await http.post(f"/credits/holds/{hold_id}/capture", headers=users[0], json={"amount": 25})
    assert capture.status_code == 200
    return {"health": health}


def _assert_counts(samples: Samples, sent: dict[str, Any]) -> None:
    assert requests_of(samples, "GET", "/health", 200) == sent["health"] + 1  # and the wait for the server
    assert requests_of(samples, "POST", "/profile", 201) == 3
    assert requests_of(samples, "GET", "/profile", 200) == 10
    assert requests_of(samples, "GET", "/profile", 404) == 2
    assert requests_of(samples, "GET", "none", 404) == 1  # no route answered: never the path itself
    assert requests_of(samples, "POST", "/billing/checkout", 200) == 1
    assert requests_of(samples, "POST", "/webhook", 200) == 3
    assert requests_of(samples, "POST", "/webhook", 400) == 1
    assert requests_of(samples, "POST", "/credits/holds/{hold_id}/capture", 200) == 1
    routes = {dict(labels).get("route") for name, labels in samples if name.startswith("picads_http_request")}
    assert not any(route and route.count("-") >= 4 for route in routes)  # no ids in the labels

    events = "picads_stripe_webhook_events_total"
    assert value(samples, events, type="checkout.session.completed", outcome="granted") == 1
    assert value(samples, events, type="checkout.session.completed", outcome="duplicate") == 1
    assert value(samples, events, type="unverified", outcome="refused") == 1
    assert value(samples, events, type="other", outcome="ignored") == 1
    calls = "picads_stripe_api_calls_total"
    assert value(samples, calls, operation="create the Stripe customer", result="ok") == 1
    assert value(samples, calls, operation="create the checkout session", result="ok") == 1

    assert value(samples, "picads_credits_granted_total", kind="signup_grant") == 3 * 1000
    assert value(samples, "picads_credits_granted_total", kind="purchase") == 500
    assert value(samples, "picads_credits_spent_total", kind="spend") == 30
    assert value(samples, "picads_credits_spent_total", kind="hold_capture") == 25
    assert value(samples, "picads_credits_held_total") == 40
    assert value(samples, "picads_credits_taken_back_total", kind="refund") == 0

    # Gauges: each live worker's own, added up (10 + 5 connections each at most).
    assert value(samples, "picads_db_pool_max_connections", pool="asyncpg") == 2 * 10
    assert value(samples, "picads_db_pool_max_connections", pool="sqlalchemy") == 2 * 5
    assert value(samples, "picads_db_pool_wait_seconds_count", pool="asyncpg") == 0


async def test_gunicorn_without_its_configuration_refuses_metrics(
    app: FastAPI, database_url: URL, tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    """Each worker would count only its own requests: the start stops, saying why in one line."""
    env = {
        **_server_env(database_url, tmp_path, fake_stripe),
        "METRICS_ENABLED": "true",
        "METRICS_TOKEN": METRICS_TOKEN,
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    arguments = ("--worker-class", "uvicorn_worker.UvicornWorker", "--bind", f"127.0.0.1:{free_port()}")
    with gunicorn(env, tmp_path, *arguments) as process:
        await asyncio.to_thread(process.wait, 60)
    output = (tmp_path / "gunicorn.log").read_text()
    assert process.returncode != 0
    assert "METRICS_ENABLED=true under gunicorn needs its configuration, --config python:app.gunicorn_conf" in output
