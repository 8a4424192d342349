"""The FastAPI application: settings, database, token verifier, middleware and routes."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Message, Receive, Scope, Send

from app import metrics
from app.auth import TokenVerifier, uses_development_secret
from app.config import Settings, describe, load_settings
from app.database import (
    close_driver_pool,
    create_engine,
    create_sessionmaker,
    open_driver_pool,
    resolve_database_url,
)
from app.deps import Resources, UserWrites, check_db_routes
from app.docs import DOCS_PATHS, document_bearer_auth, serve_docs
from app.error_reports import start_error_reports
from app.errors import StartupError, install_error_handlers
from app.middleware import ApiMiddleware
from app.routes import admin, billing, credits, operations, profile, public
from app.schema import MIGRATE_UP_TO_VARIABLE, migrate, refuse_a_mismatched_schema, schema_state
from app.services.billing.stripe_api import connect_stripe

logger = logging.getLogger("app")

# Stripe publishes no size limit for events. An event carries one object, whose lists (an invoice's lines) hold one
# page at most; the events handled here (checkout sessions, invoices and subscriptions of one price, charges,
# disputes, short metadata) are a few KB. 256 KiB leaves room for many times that, and 100 slow senders hold at
# most 25 MiB (with 4 MiB they held 400).
WEBHOOK_MAX_BODY_BYTES = 256 * 1024

DESCRIPTION = """
The Picads.ai backend. Sign in with Supabase and send the access token as `Authorization: Bearer <token>`
(in /docs, with the **Authorize** button). In development, `poetry run dev-token` prints a token for a test user.
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    url = await asyncio.to_thread(resolve_database_url, settings)
    async with AsyncExitStack() as cleanup:
        engine = create_engine(settings, url)
        cleanup.push_async_callback(engine.dispose)
        driver_pool = await open_driver_pool(settings, url)
        cleanup.push_async_callback(close_driver_pool, driver_pool, settings.db_pool_timeout)
        verifier = TokenVerifier(settings)
        cleanup.push_async_callback(verifier.aclose)
        stripe_connection = connect_stripe(settings)
        if stripe_connection is not None:
            cleanup.push_async_callback(stripe_connection.aclose)
        if settings.is_production:
            # Production runs create_tables.py before starting, and never serves a schema it does not match.
            await refuse_a_mismatched_schema(engine)
        else:
            # Development applies migrations itself (under `poetry run dev`, those that existed when it started).
            await migrate(engine, os.environ.get(MIGRATE_UP_TO_VARIABLE, "head"))
            await _warn_of_unapplied_migrations(engine)
        if settings.metrics_enabled:
            requests = app.state.request_metrics
            port, host = settings.metrics_port, settings.metrics_host
            await cleanup.enter_async_context(metrics.recording(requests, driver_pool.pool, engine, port, host))
        app.state.resources = Resources(
            settings=settings,
            engine=engine,
            sessions=create_sessionmaker(engine),
            driver_pool=driver_pool,
            verifier=verifier,
            stripe=stripe_connection,
            user_writes=UserWrites(settings.user_concurrent_writes),
        )
        _log_start(settings, url)
        yield


async def _warn_of_unapplied_migrations(engine: AsyncEngine) -> None:
    state = await schema_state(engine)
    if state is not None and state.behind:
        logger.warning(
            "revision %s was written after `poetry run dev` started and is not applied: review it, then "
            "`poetry run alembic upgrade head` (/health answers 503 until then)",
            state.head,
        )


def _log_start(settings: Settings, url: URL) -> None:
    if settings.stripe_secret_key and not settings.stripe_webhook_secret:
        logger.warning("STRIPE_WEBHOOK_SECRET is not set: /webhook refuses events, so payments grant no credits")
    embedded = "" if settings.database_configured else f" (embedded, data in {settings.data_dir / 'pgdata'})"
    logger.info(
        "database: %s%s; at most %d connections per process (DB_POOL_SIZE %d + DB_SESSION_POOL_SIZE %d)",
        describe(url),
        embedded,
        settings.connection_budget,
        settings.db_pool_size,
        settings.db_session_pool_size,
    )
    if settings.metrics_on_api_port:
        logger.info("metrics: GET /metrics, %s", "with METRICS_TOKEN" if settings.metrics_token else "open (no token)")
    if settings.sentry_dsn:
        logger.info("error reports: Sentry, environment %s", settings.sentry_environment or settings.environment)
    if uses_development_secret(settings):
        logger.info("tokens: development secret; get one with `poetry run dev-token` (or `python -m app.devtoken`)")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    docs = settings.docs_served
    app = FastAPI(
        title="Picads API",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # No OpenTelemetry here: with it off, FastAPI skips looking for providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # Our own /docs and /redoc pages (serve_docs): their scripts come from this server, not a CDN.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    # Before the middleware is added: sentry-sdk instruments what is added after it.
    start_error_reports(settings)
    request_metrics = None
    if settings.metrics_enabled:
        metrics.enable()
        request_metrics = app.state.request_metrics = metrics.RequestMetrics()
    app.add_middleware(
        ApiMiddleware,
        allowed_origins=settings.allowed_origins,
        max_body_bytes=settings.max_body_bytes,
        body_limits={"/webhook": WEBHOOK_MAX_BODY_BYTES},
        body_timeout=settings.body_timeout,
        hsts=settings.is_production,
        docs_paths=DOCS_PATHS,
        metrics=request_metrics,
    )
    # The hot paths first: routes are tried in order.
    routers = (
        profile.router,
        credits.router,
        admin.router,
        billing.router,
        billing.webhook_router,
        public.router,
        *((operations.router,) if settings.metrics_on_api_port else ()),
    )
    for router in routers:
        # The routes themselves, not `include_router`: none of ours has a prefix or shared dependencies, and
        # this FastAPI matches included routes twice per request (docs/benchmarks.md).
        app.router.routes.extend(router.routes)
    check_db_routes(app.routes)
    if docs:
        serve_docs(app)
    install_error_handlers(app)
    document_bearer_auth(app)
    _one_line_startup_errors(app)
    return app


def _one_line_startup_errors(app: FastAPI) -> None:
    """A failed start is reported with the whole traceback; a StartupError says the cause and the fix in one
    line, and that line is what the server prints."""
    lifespan = app.router.lifespan

    async def lifespan_in_one_line(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_failure_in_one_line(message: Message) -> None:
            error = sys.exception()  # what the lifespan is reporting, when it reports a failure
            if message["type"] == "lifespan.startup.failed" and isinstance(error, StartupError):
                message = {**message, "message": str(error)}
            await send(message)

        await lifespan(scope, receive, send_failure_in_one_line)

    app.router.lifespan = lifespan_in_one_line  # type: ignore[method-assign]
