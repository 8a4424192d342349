"""Prometheus metrics (prometheus-client): what the service does, for GET /metrics. Off unless METRICS_ENABLED.

Under gunicorn every worker is a process of its own: prometheus-client's multiprocess mode keeps each worker's
figures in a file of PROMETHEUS_MULTIPROC_DIR (set up by app/gunicorn_conf.py), and a scrape adds them up, whichever
worker (or the master, on METRICS_PORT) answers it. Served by one process (`python main.py`, the tests), the
figures are that process's own.

The metrics are the library's process-wide objects, and so is the switch that turns recording on, thrown once at
start-up (`enable`): with it off, nothing here is recorded. Per request the middleware adds one histogram
observation, its labelled child looked up once per route, method and status; gauges (in-flight requests, the
pools) are sampled once a second instead of moved by every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server
from prometheus_client.exposition import choose_encoder
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool
from starlette.types import Scope

from app.errors import StartupError

logger = logging.getLogger(__name__)

MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_SECONDS = 1.0
# The methods the API answers; anything else a client sends is counted as "other" (labels stay few).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Credits leave a balance as spends (a spend, a captured hold); every other ledger kind adds or takes back.
SPENT_KINDS = ("spend", "hold_capture")
GRANT_KINDS = ("signup_grant", "anonymous_grant", "purchase", "subscription_grant", "dispute_reversal", "adjustment")
TAKE_BACK_KINDS = ("refund", "dispute", "adjustment")
POOLS = ("asyncpg", "sqlalchemy")

_registry = CollectorRegistry(auto_describe=True)
REQUEST_SECONDS = Histogram(
    "picads_http_request_duration_seconds",
    "Requests by method, route template and status, and how long they took (its _count counts the requests)",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=_registry,
)
IN_FLIGHT = Gauge(
    "picads_http_requests_in_flight", "Requests being served", multiprocess_mode="livesum", registry=_registry
)
POOL_CONNECTIONS = Gauge(
    "picads_db_pool_connections", "Open connections", ["pool"], multiprocess_mode="livesum", registry=_registry
)
POOL_IN_USE = Gauge(
    "picads_db_pool_in_use", "Connections checked out", ["pool"], multiprocess_mode="livesum", registry=_registry
)
POOL_MAX = Gauge(
    "picads_db_pool_max_connections", "Most connections", ["pool"], multiprocess_mode="livesum", registry=_registry
)
POOL_WAIT_SECONDS = Histogram(
    "picads_db_pool_wait_seconds",
    "Checkouts that found every connection in use, and how long they waited (a 503 after DB_POOL_TIMEOUT)",
    ["pool"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=_registry,
)
WEBHOOK_EVENTS = Counter(
    "picads_stripe_webhook_events", "Stripe webhook deliveries by event type and outcome", ["type", "outcome"],
    registry=_registry,
)  # fmt: skip
STRIPE_CALLS = Counter(
    "picads_stripe_api_calls", "Calls to Stripe's API by operation and result", ["operation", "result"],
    registry=_registry,
)  # fmt: skip
CREDITS_GRANTED = Counter("picads_credits_granted", "Credits added to balances", ["kind"], registry=_registry)
CREDITS_SPENT = Counter("picads_credits_spent", "Credits spent", ["kind"], registry=_registry)
CREDITS_HELD = Counter("picads_credits_held", "Credits reserved by new holds", registry=_registry)
CREDITS_TAKEN_BACK = Counter(
    "picads_credits_taken_back", "Credits taken back from balances", ["kind"], registry=_registry
)


class _Switch:
    on = False


def enable() -> None:
    """Record from now on, in this process (at start-up, when METRICS_ENABLED)."""
    _Switch.on = True
    for kind in GRANT_KINDS:
        CREDITS_GRANTED.labels(kind)  # every series from the start, at 0
    for kind in SPENT_KINDS:
        CREDITS_SPENT.labels(kind)
    for kind in TAKE_BACK_KINDS:
        CREDITS_TAKEN_BACK.labels(kind)
    for pool in POOLS:
        POOL_WAIT_SECONDS.labels(pool)


def multiprocess_mode() -> bool:
    """Whether the figures live in files shared by several processes (prometheus-client decides it the same way)."""
    return MULTIPROCESS_VARIABLE in os.environ


def exposed_registry() -> CollectorRegistry:
    """What a scrape reads: every worker's files added up, or this process's own metrics."""
    if not multiprocess_mode():
        return _registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def render(accept: str | None) -> tuple[bytes, str]:
    """The metrics in the format the scraper asked for (Prometheus' text format, or OpenMetrics), and its type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(exposed_registry()), content_type


# --- Requests (the middleware) ---------------------------------------------------------------------------------


class RequestMetrics:
    """What the middleware records: each request's duration by method, route template and status (never the path:
    ids would make a series each), and how many requests are being served."""

    __slots__ = ("children", "in_flight")

    def __init__(self) -> None:
        # By the route's id (routes live as long as the app, and cannot be hashed), method and status.
        self.children: dict[tuple[int, str, int], Any] = {}
        self.in_flight = 0

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        route, method = scope.get("route"), scope["method"]
        child = self.children.get((id(route), method, status))
        if child is None:
            known = method in METHODS
            path = getattr(route, "path", None) or "none"  # no route answered: a 404, or refused before routing
            child = REQUEST_SECONDS.labels(method if known else "other", path, status)
            if known:  # a client's made-up methods are not remembered one by one
                self.children[(id(route), method, status)] = child
        child.observe(seconds)


# --- Services ------------------------------------------------------------------------------------------------


def count_credits(kind: str, amount: int) -> None:
    """A ledger entry written: `amount` signed, as in the ledger (a spend is negative)."""
    if not _Switch.on or amount == 0:
        return
    if kind in SPENT_KINDS:
        CREDITS_SPENT.labels(kind).inc(-amount)
    elif amount > 0:
        CREDITS_GRANTED.labels(kind).inc(amount)
    else:
        CREDITS_TAKEN_BACK.labels(kind).inc(-amount)


def count_held(amount: int) -> None:
    if _Switch.on:
        CREDITS_HELD.inc(amount)


def count_webhook_event(event_type: str, outcome: str) -> None:
    if _Switch.on:
        WEBHOOK_EVENTS.labels(event_type, outcome).inc()


def count_stripe_call(operation: str, result: str) -> None:
    if _Switch.on:
        STRIPE_CALLS.labels(operation, result).inc()


def observe_pool_wait(pool: str, seconds: float) -> None:
    if _Switch.on:
        POOL_WAIT_SECONDS.labels(pool).observe(seconds)


# --- While the app runs ----------------------------------------------------------------------------------------


def _sample(requests: RequestMetrics, driver_pool: asyncpg.Pool, engine: AsyncEngine) -> None:
    IN_FLIGHT.set(requests.in_flight)
    in_use = driver_pool.get_size() - driver_pool.get_idle_size()
    for name, size, used, most in (
        ("asyncpg", driver_pool.get_size(), in_use, driver_pool.get_max_size()),
        ("sqlalchemy", *_queue_pool_figures(engine)),
    ):
        POOL_CONNECTIONS.labels(name).set(size)
        POOL_IN_USE.labels(name).set(used)
        POOL_MAX.labels(name).set(most)


def _queue_pool_figures(engine: AsyncEngine) -> tuple[int, int, int]:
    pool = engine.pool  # no overflow (app/database.py): its size is its most
    if not isinstance(pool, QueuePool):
        return 0, 0, 0
    return pool.checkedin() + pool.checkedout(), pool.checkedout(), pool.size()


def under_gunicorn() -> bool:
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/")


class MetricsPortUnavailable(StartupError):
    """The metrics' own port cannot be listened on (taken, or an address this machine does not have)."""


def serve_port(port: int, host: str) -> tuple[Any, Any]:
    """METRICS_PORT's listener (prometheus-client's own server, in a thread): the server and its thread."""
    try:
        return start_http_server(port, host, registry=exposed_registry())
    except OSError as exc:
        raise MetricsPortUnavailable(f"METRICS_PORT {port} on {host}: {exc.strerror or exc}") from None


@contextlib.asynccontextmanager
async def recording(
    requests: RequestMetrics, driver_pool: asyncpg.Pool, engine: AsyncEngine, port: int | None, host: str
) -> AsyncIterator[None]:
    """While the app runs: the gauges sampled each second and, served by one process, METRICS_PORT's listener
    (under gunicorn the master serves it: app/gunicorn_conf.py)."""

    async def sample_forever() -> None:
        while True:
            _sample(requests, driver_pool, engine)
            await asyncio.sleep(SAMPLE_SECONDS)

    if under_gunicorn() and not multiprocess_mode():
        raise StartupError(
            "METRICS_ENABLED=true under gunicorn needs its configuration, --config python:app.gunicorn_conf (as "
            "`poetry run start` and the Docker image use): each worker would report only its own requests"
        )
    listener = serve_port(port, host) if port and not under_gunicorn() else None
    if listener is not None:
        logger.info("metrics: http://%s:%d/metrics", host, port)
    sampler = asyncio.get_running_loop().create_task(sample_forever())
    try:
        yield
    finally:
        sampler.cancel()
        if listener is not None:
            server, _ = listener
            server.shutdown()
            server.server_close()
