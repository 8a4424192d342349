"""Process the Stripe events this service missed, from Stripe's events API, through the webhook's own code.

    poetry run stripe-reconcile [--since 3d] [--dry-run]

Run it after an outage, and daily as a cron job: the exit status is 1 when any event failed (each is named on a
line of its own), 2 when it could not run at all, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from app.config import load_settings
from app.database import create_engine, create_sessionmaker, resolve_database_url
from app.errors import AppError
from app.services.billing.reconcile import reconcile
from app.services.billing.stripe_api import connect_stripe

# Stripe's events API keeps events for 30 days.
MAX_SINCE = timedelta(days=30)
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def since(text: str) -> timedelta:
    """`3d`, `12h` or `90m`, at most 30 days."""
    found = re.fullmatch(r"\s*(\d+)\s*([dhm])\s*", text)
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 3d, 12h or 90m")
    span = timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})
    if span > MAX_SINCE:
        raise argparse.ArgumentTypeError("Stripe keeps events for 30 days: --since can be at most 30d")
    return span


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stripe-reconcile", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--since", type=since, default=timedelta(days=3), help="how far back to look (default 3d)")
    parser.add_argument("--dry-run", action="store_true", help="only count the events that were missed")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    connection = connect_stripe(settings)
    if connection is None:
        print("stripe-reconcile: STRIPE_SECRET_KEY is not set: there is no Stripe to ask", file=sys.stderr)
        return 2
    start = datetime.now(UTC) - args.since
    engine = create_engine(settings, await asyncio.to_thread(resolve_database_url, settings))
    try:
        report = await reconcile(
            create_sessionmaker(engine), connection.client, settings.catalogue, start, dry_run=args.dry_run
        )
    except AppError as exc:  # Stripe could not list the events
        print(f"stripe-reconcile: {exc.detail}", file=sys.stderr)
        return 2
    finally:
        await connection.aclose()
        await engine.dispose()
    print(f"Stripe events of the handled types since {start.isoformat(timespec='seconds')}:")
    for result in ("processed", "already seen", "ignored", "missing", "failed"):
        if result in report.counts or result in {"processed", "failed"}:
            print(f"  {result:<13}{report.counts[result]}")
    for failure in report.failures:
        print(f"failed: {failure}")
    return 1 if report.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
