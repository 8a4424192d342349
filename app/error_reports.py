"""Error reports: with SENTRY_DSN set, sentry-sdk (its FastAPI integration) reports unhandled exceptions, 5xx answers
other than 503, and error log lines; without it nothing is set up and nothing is sent.

Nothing secret leaves: no request bodies, cookies or query strings, no local variables; headers that carry
credentials, and anything shaped like a token, a key, a signature or a URL's password, are replaced wherever they
appear (messages, exceptions, breadcrumbs, extra data), as are this server's own secrets, by value. Each event is
tagged with the request's id, the X-Request-ID its answer carried.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, cast

import sentry_sdk
from sentry_sdk.integrations.fastapi import FastApiIntegration
from sentry_sdk.integrations.logging import ignore_logger
from sentry_sdk.integrations.starlette import StarletteIntegration
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber
from sentry_sdk.types import Event, Hint

from app.config import Settings
from app.logs import REQUEST_ID

FILTERED = "[Filtered]"
# Answers reported as errors: 503s (the database or Stripe unreachable, an event ahead of its grant) are expected
# and retried; they show in the metrics' 5xx rate instead.
REPORTED_STATUSES = frozenset(range(500, 600)) - {503}
# Headers, fields and variables whose values are never sent (compared in lower case, `-` as `_`).
SECRET_NAMES = frozenset(
    name.lower().replace("-", "_")
    for name in (
        *DEFAULT_DENYLIST,
        "stripe_signature",
        "idempotency_key",
        "dsn",
        "database_url",
        "db_password",
        "metrics_token",
        "access_token",
        "refresh_token",
        "client_secret",
    )
)
# Secrets by their shape, wherever they appear in text, and what replaces them.
SECRET_PATTERNS = (
    # JWTs (Supabase's access tokens, legacy service-role and anon keys).
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), FILTERED),
    # Bearer and Basic credentials.
    (re.compile(r"(?i)\b(bearer|basic) +[^\s,;]+"), rf"\1 {FILTERED}"),
    # Stripe's keys, webhook secrets and signatures; Supabase's new secret keys.
    (
        re.compile(r"\b(?:sk|rk|pk)_(?:test|live)_[A-Za-z0-9]+|\bwhsec_[A-Za-z0-9+/=]+|\bsb_secret_[A-Za-z0-9_-]+"),
        FILTERED,
    ),
    (re.compile(r"\b(v[01])=[0-9a-f]{64}\b"), rf"\1={FILTERED}"),
    # A URL's password (a DATABASE_URL's): scheme://user:password@host.
    (re.compile(r"(://[^/\s:@]*:)[^/\s@]+@"), rf"\1{FILTERED}@"),
    # password=..., token=... in query and connection strings.
    (re.compile(r"(?i)\b(password|passwd|pwd|token|secret|api_key|apikey)=[^&;\s]+"), rf"\1={FILTERED}"),
)


class Scrubber:
    """before_send: the event without anything secret, tagged with the request id."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret containing another is replaced whole.
        self.secrets = sorted((value for value in secrets if len(value) >= 8), key=len, reverse=True)

    def __call__(self, event: Event, hint: Hint) -> Event:
        request: Any = event.get("request")
        if isinstance(request, dict):
            for field in ("data", "cookies", "query_string", "env"):
                request.pop(field, None)
        scrubbed = cast(dict[str, Any], self.scrub(event))
        request_id = REQUEST_ID.get()
        if request_id is not None:
            tags = scrubbed.setdefault("tags", {})
            if isinstance(tags, dict):
                tags["request_id"] = request_id
        return cast(Event, scrubbed)

    def scrub(self, value: Any, name: str = "") -> Any:
        if _secret_name(name) and value not in (None, "", [], {}):
            return FILTERED
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, dict):
            return {key: self.scrub(item, str(key)) for key, item in value.items()}
        if isinstance(value, list | tuple):
            if len(value) == 2 and isinstance(value[0], str) and _secret_name(value[0]):
                return [value[0], FILTERED]  # a header as a [name, value] pair
            return [self.scrub(item) for item in value]
        return value

    def scrub_text(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, FILTERED)
        for pattern, replacement in SECRET_PATTERNS:
            text = pattern.sub(replacement, text)
        return text


def _secret_name(name: str) -> bool:
    return name.lower().replace("-", "_") in SECRET_NAMES


def configured_secrets(settings: Settings) -> list[str]:
    """This server's own secrets, to be replaced wherever their values appear."""
    values = [
        settings.supabase_jwt_secret,
        settings.supabase_service_role_key,
        settings.stripe_secret_key,
        settings.stripe_webhook_secret,
        settings.db_password,
        settings.metrics_token,
        settings.sentry_dsn,
    ]
    found = [value.get_secret_value() for value in values if value is not None]
    if settings.database_configured and settings.database_url_object.password:
        found.append(settings.database_url_object.password)
    return found


def start_error_reports(settings: Settings) -> bool:
    """Set up sentry-sdk when SENTRY_DSN is set (before the app's middleware is added, which it instruments);
    whether it was."""
    if settings.sentry_dsn is None:
        return False
    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.sentry_environment or settings.environment,
        release=settings.sentry_release,
        integrations=[
            StarletteIntegration(failed_request_status_codes=set(REPORTED_STATUSES)),
            FastApiIntegration(failed_request_status_codes=set(REPORTED_STATUSES)),
        ],
        # Only what is listed: no instrumentation of the database driver or HTTP clients on every call.
        auto_enabling_integrations=False,
        # Sentry's default leaves out personal data (cookies, client addresses, users); nor local variables here.
        include_local_variables=False,
        max_request_body_size="never",
        event_scrubber=EventScrubber(denylist=sorted(SECRET_NAMES), recursive=True),
        before_send=Scrubber(configured_secrets(settings)),
    )
    # The error handler's own "unhandled ..." line would repeat the exception Sentry reports with its traceback.
    ignore_logger("app.errors")
    return True
