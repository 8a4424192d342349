"""Every operation of the OpenAPI document, fuzzed against the real server, with and without a valid token:
no 5xx, and every answer has a documented status code and matches its documented schema."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy.engine import URL

from app.application import create_app
from app.config import Settings
from tests.conftest import (
    PROJECT_ROOT,
    TEST_JWT_SECRET,
    bearer,
    free_port,
    sign,
    user_claims,
)
from tests.fake_stripe import WEBHOOK_SECRET

NEEDS_STRIPE = {"/billing/checkout", "/billing/portal"}
# Where a schema-valid request can rightly be refused, for reasons no schema can state.
REFUSES_VALID_LOOKING_DATA = {
    "/webhook",  # a valid Stripe signature
    "/credits/spend",  # 402 once the balance is lower than the amount
    "/admin/profiles/{user_id}/credits",  # 402 below zero, 404 for a user without a profile
    "/credits/holds",  # 402 once too little is available
    "/credits/holds/{hold_id}/capture",  # 404 for a hold that does not exist
    "/credits/holds/{hold_id}/release",
}

# The document the server publishes, built here so the test can be parametrized by operation.
schema = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None)).openapi())


@pytest.fixture(scope="module")
def live_server(database_url: URL, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DB_", "SUPABASE_", "DATABASE"))}
    env.update(
        {
            "ENVIRONMENT": "test",
            "DATABASE_URL": database_url.render_as_string(hide_password=False),
            "SUPABASE_JWT_SECRET": TEST_JWT_SECRET,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "DATA_DIR": str(tmp_path_factory.mktemp("fuzz")),
            "PORT": str(port),
            "LOG_LEVEL": "WARNING",
        }
    )
    server = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "main.py")],
        cwd=tmp_path_factory.mktemp("fuzz-cwd"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            pytest.fail(f"the server did not start: {server.communicate()[1].decode()[-2000:]}")
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    _, errors = server.communicate(timeout=30)
    assert b"Traceback" not in errors, errors.decode()[-3000:]


@pytest.fixture(scope="module")
def member(live_server: str) -> dict[str, str]:
    """A user with a profile, so authenticated cases reach the ledger and the profile update."""
    headers = bearer(sign(user_claims(uuid.uuid4())))
    assert httpx.post(f"{live_server}/profile", headers=headers).status_code == 201
    return headers


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_answers_as_documented(case: schemathesis.Case[Any], live_server: str, member: dict[str, str]) -> None:
    # Without STRIPE_SECRET_KEY (no network here) these answer their documented 503 "payments are not
    # configured"; every other check still applies to them.
    excluded: list[schemathesis.CheckFunction] = [not_a_server_error] if case.path in NEEDS_STRIPE else []
    if case.path in REFUSES_VALID_LOOKING_DATA:
        excluded.append(positive_data_acceptance)
    for headers in (None, member):
        response = case.call_and_validate(base_url=live_server, headers=headers, excluded_checks=excluded)
        assert response.status_code < 500 or (case.path in NEEDS_STRIPE and response.status_code == 503)
