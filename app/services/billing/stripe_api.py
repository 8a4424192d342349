"""The async Stripe client, and Stripe's failures as answers that say what went wrong."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import stripe

from app.config import Settings
from app.errors import AppError, ServiceUnavailable
from app.metrics import count_stripe_call

logger = logging.getLogger(__name__)


class StripeNotConfigured(ServiceUnavailable):
    """This server lacks a Stripe setting the endpoint needs: trying again in a moment will not help."""

    default_detail = "payments are not configured on this server (STRIPE_SECRET_KEY is not set)"
    retry_after = 3600


WEBHOOKS_NOT_CONFIGURED = "webhooks are not configured on this server (STRIPE_WEBHOOK_SECRET is not set)"


class StripeFailed(AppError):
    """A call to Stripe failed: 502, naming the action and the reason, never anything secret."""

    status_code = 502

    def __init__(self, action: str, exc: stripe.StripeError | None = None) -> None:
        if exc is not None:
            logger.warning(
                "Stripe could not %s: %s (code %s, request %s)", action, type(exc).__name__, exc.code, exc.request_id
            )
        super().__init__(f"could not {action}: {_reason(exc)}; try again shortly")


def _reason(exc: stripe.StripeError | None) -> str:
    if exc is None:
        return "Stripe returned no URL"
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return "Stripe refused this server's API key (check STRIPE_SECRET_KEY)"
    if isinstance(exc, stripe.APIConnectionError):
        return "Stripe could not be reached"
    if isinstance(exc, stripe.InvalidRequestError) and exc.user_message:
        return f"Stripe refused the request: {exc.user_message}"
    return "Stripe failed"


@dataclass(frozen=True, slots=True)
class StripeConnection:
    """The Stripe client and the async HTTP client under it (ours to close)."""

    client: stripe.StripeClient
    http: stripe.HTTPXClient

    async def aclose(self) -> None:
        await self.http.close_async()  # type: ignore[no-untyped-call]


def connect_stripe(settings: Settings) -> StripeConnection | None:
    """An async Stripe client with the configured timeout and address; None without a secret key."""
    if settings.stripe_secret_key is None:
        return None
    http = stripe.HTTPXClient(timeout=settings.stripe_timeout)
    client = stripe.StripeClient(
        settings.stripe_secret_key.get_secret_value(),
        http_client=http,
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None,
        max_network_retries=settings.stripe_max_network_retries,
    )
    return StripeConnection(client, http)


class StripeUnreachable(ServiceUnavailable):
    """Stripe's API did not answer in time (or answered with its own failure): the event is tried again later."""

    default_detail = "Stripe's API could not be reached: nothing was changed, try again later"
    retry_after = 60


Answer = TypeVar("Answer")


async def counted(action: str, call: Awaitable[Answer]) -> Answer:
    """One call to Stripe's API, counted in the metrics by its action ("read the invoice") and result; its errors
    are raised as they are."""
    try:
        answer = await call
    except stripe.StripeError as exc:
        count_stripe_call(action, _result(exc))
        raise
    count_stripe_call(action, "ok")
    return answer


def _result(exc: stripe.StripeError) -> str:
    if isinstance(exc, stripe.InvalidRequestError) and exc.code == "resource_missing":
        return "not_found"
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return "unauthorized"
    if isinstance(exc, stripe.RateLimitError):
        return "rate_limited"
    if isinstance(exc, stripe.APIConnectionError):
        return "unreachable"
    if isinstance(exc, stripe.APIError):
        return "stripe_error"
    return "refused"


async def fetch(action: str, call: Awaitable[stripe.StripeObject]) -> dict[str, Any] | None:
    """One call to Stripe's API, as a plain dict; None when the object does not exist. Stripe being unreachable,
    slow or failing on its side is a 503 (nothing written), so Stripe retries the event later; a refusal of this
    server's request is a 502."""
    try:
        found = await counted(action, call)
    except stripe.InvalidRequestError as exc:
        if exc.code == "resource_missing":
            return None
        raise StripeFailed(action, exc) from None
    except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
        logger.warning("Stripe could not %s: %s (request %s)", action, type(exc).__name__, exc.request_id)
        raise StripeUnreachable from None
    except stripe.StripeError as exc:
        raise StripeFailed(action, exc) from None
    data: dict[str, Any] = found.to_dict()
    return data
