"""Stripe events this service missed (it was down longer than Stripe retries, or the endpoint was misconfigured),
found in Stripe's events API and processed through the same code as the webhook. Exactly once still holds: an
event already recorded is skipped, and one arriving at the same time by webhook is processed by one of the two
(the other finds it recorded)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from stripe import StripeClient

from app.config import Catalogue
from app.errors import AppError
from app.models import StripeEvent
from app.services.billing.events import WebhookContext
from app.services.billing.handlers import HANDLED_EVENTS
from app.services.billing.stripe_api import fetch
from app.services.billing.webhook import WebhookResult, process_event

logger = logging.getLogger(__name__)

PAGE_SIZE = 100


@dataclass
class Report:
    """What a reconciliation found and did: counts by result, and a line for each event that failed."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.failures)


async def handled_events_since(client: StripeClient, since: datetime) -> list[dict[str, Any]]:
    """Every event of a handled type Stripe created since `since`, oldest first (Stripe lists newest first)."""
    events: list[dict[str, Any]] = []
    params: Any = {"created": {"gte": int(since.timestamp())}, "types": list(HANDLED_EVENTS), "limit": PAGE_SIZE}
    while True:
        page = await fetch("list events", client.v1.events.list_async(params)) or {}
        events.extend(page.get("data", []))
        if not page.get("has_more") or not events:
            return events[::-1]
        params = {**params, "starting_after": events[-1]["id"]}


async def process_one(
    sessions: async_sessionmaker[AsyncSession], client: StripeClient, catalogue: Catalogue, data: dict[str, Any]
) -> WebhookResult:
    """One event, in a transaction of its own, as the webhook would process it."""
    async with sessions.begin() as session:
        return await process_event(WebhookContext(session, catalogue, client), data)


async def reconcile(
    sessions: async_sessionmaker[AsyncSession],
    client: StripeClient,
    catalogue: Catalogue,
    since: datetime,
    *,
    dry_run: bool = False,
) -> Report:
    report = Report()
    for data in await handled_events_since(client, since):
        async with sessions() as session:
            seen = await session.scalar(select(StripeEvent.id).where(StripeEvent.id == data["id"]))
        if seen is not None:
            report.counts["already seen"] += 1
        elif dry_run:
            report.counts["missing"] += 1
        else:
            await _process(sessions, client, catalogue, data, report)
    return report


async def _process(
    sessions: async_sessionmaker[AsyncSession],
    client: StripeClient,
    catalogue: Catalogue,
    data: dict[str, Any],
    report: Report,
) -> None:
    try:
        result = await process_one(sessions, client, catalogue, data)
    except AppError as exc:  # Stripe unreachable, a grant not recorded yet...: tried again by the next run
        report.counts["failed"] += 1
        report.failures.append(f"{data['id']} ({data.get('type')}): {exc.detail}")
        return
    except Exception as exc:  # any other: the event stays unrecorded, and the run goes on with the next
        logger.exception("reconciling Stripe event %s failed", data["id"])
        report.counts["failed"] += 1
        report.failures.append(f"{data['id']} ({data.get('type')}): {type(exc).__name__}")
        return
    if result.duplicate:  # a webhook delivered it meanwhile
        report.counts["already seen"] += 1
    elif result.outcome.startswith(("ignored", "rejected")):
        report.counts["ignored"] += 1
    else:
        report.counts["processed"] += 1
