"""Stripe's webhook: the signature check, then each event recorded and applied exactly once.

A webhook event is recorded in `stripe_events` in the same transaction as its effects, so a second delivery
changes nothing; grants are also unique per Stripe object (checkout session, invoice) in the ledger.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import stripe
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import AppError
from app.metrics import count_webhook_event
from app.models import StripeEvent
from app.services.billing.events import EventIgnored, Handler, WebhookContext
from app.services.billing.handlers import HANDLERS
from app.services.billing.payloads import Event
from app.services.billing.stripe_api import fetch

logger = logging.getLogger(__name__)


class WebhookRefused(AppError):
    """What Stripe sent cannot be verified as a Stripe event from this endpoint: 400, and Stripe retries."""

    status_code = 400


MISSING_SIGNATURE = "missing Stripe-Signature header"
INVALID_SIGNATURE = (
    "invalid Stripe signature: STRIPE_WEBHOOK_SECRET must be the signing secret of this endpoint "
    "(or of `stripe listen`), and the body must reach the server unchanged"
)
STALE_SIGNATURE = "Stripe signature timestamp is too old: check this server's clock, or resend the event"
FUTURE_SIGNATURE = "Stripe signature timestamp is in the future: check this server's clock"
NOT_AN_EVENT = "the webhook body is not a Stripe event"


def verify_event(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """The event, once its Stripe-Signature is verified on the raw body and its time is within 300 s of this
    server's clock, either way; else 400 (counted in the metrics: a wrong secret refuses every payment)."""
    try:
        return _verified(payload, signature, secret)
    except WebhookRefused:
        count_webhook_event(UNVERIFIED, "refused")
        raise


def _verified(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    if not signature:
        raise WebhookRefused(MISSING_SIGNATURE)
    try:
        event = stripe.Webhook.construct_event(payload, signature, secret)
    except stripe.SignatureVerificationError as exc:
        if str(exc).startswith("Timestamp outside the tolerance zone"):
            raise WebhookRefused(STALE_SIGNATURE) from None
        raise WebhookRefused(INVALID_SIGNATURE) from None
    except ValueError:  # not UTF-8 or not JSON (UnicodeDecodeError is a ValueError)
        raise WebhookRefused(NOT_AN_EVENT) from None
    # The library refuses only old timestamps: a delivery signed for later would be replayable until then. Its
    # signed time read as the library reads it (the first `t=`), now that the signature over it checked out.
    fields = [item.split("=", 2) for item in signature.split(",")]
    signed_at = int(next(field[1] for field in fields if field[0] == "t"))
    if signed_at > time.time() + stripe.Webhook.DEFAULT_TOLERANCE:
        raise WebhookRefused(FUTURE_SIGNATURE)
    data: dict[str, Any] = event.to_dict()
    if not isinstance(data.get("id"), str) or not isinstance(data.get("type"), str):
        raise WebhookRefused(NOT_AN_EVENT)
    return data


# The metrics' name for an event whose signature did not check out (its type is not to be believed), and for types
# not handled here (only Stripe's own types reach this far, but which ones is up to the endpoint's settings).
UNVERIFIED = "unverified"
OTHER_TYPE = "other"
# Each outcome's first word, and what the metrics call it: a few words, never the outcome's own text.
OUTCOME_KINDS = {
    "granted": "granted",
    "took": "taken_back",
    "gave": "given_back",
    "subscription": "updated",
    "waiting": "waiting",
    "payment": "payment_failed",
    "ignored": "ignored",
    "rejected": "rejected",
    "duplicate": "duplicate",
    "already": "unchanged",
    "nothing": "unchanged",
    "dispute": "unchanged",
}


@dataclass(frozen=True, slots=True)
class WebhookResult:
    duplicate: bool
    outcome: str
    type: str = ""

    @property
    def kind(self) -> str:
        """The outcome in a word, for the metrics: granted, taken_back, ignored, rejected, duplicate..."""
        return OUTCOME_KINDS.get(self.outcome.split(":")[0].split(" ")[0], "other")


def type_label(event_type: str) -> str:
    return event_type if event_type in HANDLERS else OTHER_TYPE


async def receive(ctx: WebhookContext, data: dict[str, Any]) -> WebhookResult:
    """A delivery to the webhook: processed, and counted in the metrics by type and outcome (`failed` when it
    could not be processed now, and Stripe will retry)."""
    try:
        result = await process_event(ctx, data)
    except Exception:
        count_webhook_event(type_label(data["type"]), "failed")
        raise
    count_webhook_event(type_label(result.type), result.kind)
    return result


class EventNotFound(AppError):
    status_code = 404
    default_detail = "Stripe has no event with this id (it keeps events for 30 days)"


async def replay_event(ctx: WebhookContext, event_id: str) -> WebhookResult:
    """One event fetched from Stripe's API and processed as if delivered now (nothing changes if it was)."""
    data = await fetch("read the event", ctx.client.v1.events.retrieve_async(event_id))
    if data is None:
        raise EventNotFound
    return await process_event(ctx, data)


async def process_event(ctx: WebhookContext, data: dict[str, Any]) -> WebhookResult:
    """Record the event and apply it, in the caller's transaction; a duplicate delivery changes nothing. What the
    handler needs from Stripe's API is fetched first, before any database work."""
    try:
        event = Event.model_validate(data)
    except ValidationError as exc:
        return await _reject(ctx.session, data, exc)
    handler = HANDLERS.get(event.type)
    prepared = await _prepare(ctx, event, handler) if handler else None
    recorded = await ctx.session.scalar(
        insert(StripeEvent)
        .values(id=event.id, type=event.type, created=event.created_at)
        .on_conflict_do_nothing(index_elements=[StripeEvent.id])
        .returning(StripeEvent.id)
    )
    if recorded is None:
        logger.info("Stripe event %s (%s) already processed", event.id, event.type)
        return WebhookResult(duplicate=True, outcome="duplicate: already processed", type=event.type)
    if handler is None:
        outcome = "ignored: event type not handled"
    elif isinstance(prepared, str):
        outcome = prepared
    else:
        outcome = await _apply(replace(ctx, event_id=event.id), event, handler, prepared)
    await ctx.session.execute(update(StripeEvent).where(StripeEvent.id == event.id).values(outcome=outcome))
    logger.info("Stripe event %s (%s): %s", event.id, event.type, outcome)
    return WebhookResult(duplicate=False, outcome=outcome, type=event.type)


async def _prepare(ctx: WebhookContext, event: Event, handler: Handler[Any]) -> Any:
    """The event's payload, read into its model and completed from Stripe's API; or, when it cannot be, the
    outcome that says why (a payload signed by Stripe, but not in a shape we can act on)."""
    try:
        payload = handler.payload.model_validate(event.data.object)
        return await handler.prepare(ctx, payload) if handler.prepare else payload
    except ValidationError as exc:
        logger.error("Stripe event %s (%s) rejected: %s", event.id, event.type, _problems(exc))
        return f"rejected: {_problems(exc)}"


async def _apply(ctx: WebhookContext, event: Event, handler: Handler[Any], payload: Any) -> str:
    try:
        # A savepoint: what the event asks may be impossible to apply (a grant beyond any balance), and then its
        # writes are undone and the outcome recorded, instead of a 5xx Stripe would retry for three days.
        async with ctx.session.begin_nested():
            outcome: str = await handler.apply(ctx, event, payload)
            return outcome
    except EventIgnored as ignored:
        return f"ignored: {ignored}"
    except DBAPIError as exc:
        if not _is_data_error(exc):
            raise
        logger.error("Stripe event %s (%s) cannot be applied: %s", event.id, event.type, type(exc.orig).__name__)
        return "rejected: its amounts are beyond what a balance can hold"


def _is_data_error(exc: DBAPIError) -> bool:
    """PostgreSQL's data exceptions (class 22: a number out of range...), or asyncpg refusing to encode one."""
    original = exc.orig.__cause__ if exc.orig is not None and exc.orig.__cause__ else exc.orig
    refused_by_driver = isinstance(original, asyncpg.InterfaceError) and isinstance(original, ValueError)
    return refused_by_driver or str(getattr(original, "sqlstate", "")).startswith("22")


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors())[:500]


async def _reject(session: AsyncSession, data: dict[str, Any], exc: ValidationError) -> WebhookResult:
    """An event whose envelope is unusable (its time, say) is recorded as rejected, once: Stripe would retry
    a 5xx for three days, and the same payload would fail every time."""
    outcome = f"rejected: {_problems(exc)}"
    logger.error("Stripe event %s (%s) %s", data["id"], data["type"], outcome)
    recorded = await session.scalar(
        insert(StripeEvent)
        .values(id=data["id"], type=data["type"], created=datetime.now(UTC), outcome=outcome)
        .on_conflict_do_nothing(index_elements=[StripeEvent.id])
        .returning(StripeEvent.id)
    )
    if recorded is None:
        return WebhookResult(duplicate=True, outcome="duplicate: already processed", type=data["type"])
    return WebhookResult(duplicate=False, outcome=outcome, type=data["type"])
