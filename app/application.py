"""The FastAPI application: settings, database, token verifier, middleware and routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.engine import URL

from app.auth import TokenVerifier, uses_development_secret
from app.config import Settings, describe, load_settings
from app.database import (
    close_driver_pool,
    create_engine,
    create_sessionmaker,
    migrate,
    open_driver_pool,
    resolve_database_url,
)
from app.deps import Resources
from app.docs import document_bearer_auth
from app.errors import install_error_handlers
from app.middleware import ApiMiddleware
from app.routes import admin, billing, credits, profile, public
from app.services.billing.stripe_api import connect_stripe

logger = logging.getLogger("app")

# Stripe publishes no size limit for events. An event carries one object, whose lists (an invoice's lines) hold one
# page at most; the events handled here (checkout sessions, invoices and subscriptions of one price, charges,
# disputes, short metadata) are a few KB. 256 KiB leaves room for many times that, and 100 slow senders hold at
# most 25 MiB (with 4 MiB they held 400).
WEBHOOK_MAX_BODY_BYTES = 256 * 1024
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")

DESCRIPTION = """
The Picads.ai backend. Sign in with Supabase and send the access token as `Authorization: Bearer <token>`
(the **Authorize** button above). In development, `poetry run dev-token` prints a token for a test user.
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
        if not settings.is_production:
            # Development applies migrations itself; production runs create_tables.py before starting.
            await migrate(engine)
        app.state.resources = Resources(
            settings=settings,
            engine=engine,
            sessions=create_sessionmaker(engine),
            driver_pool=driver_pool,
            verifier=verifier,
            stripe=stripe_connection,
        )
        _log_start(settings, url)
        yield


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
    if uses_development_secret(settings):
        logger.info("tokens: development secret; get one with `poetry run dev-token` (or `python -m app.devtoken`)")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    docs = settings.docs_enabled
    app = FastAPI(
        title="Picads API",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # No OpenTelemetry here: with it off, FastAPI skips looking for providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    app.add_middleware(
        ApiMiddleware,
        allowed_origins=settings.allowed_origins,
        max_body_bytes=settings.max_body_bytes,
        body_limits={"/webhook": WEBHOOK_MAX_BODY_BYTES},
        body_timeout=settings.body_timeout,
        hsts=settings.is_production,
        docs_paths=DOCS_PATHS,
    )
    # The hot paths first: routes are tried in order.
    routers = (
        profile.router,
        credits.router,
        admin.router,
        billing.router,
        billing.webhook_router,
        public.router,
    )
    for router in routers:
        # The routes themselves, not `include_router`: none of ours has a prefix or shared dependencies, and
        # matching through included routers costs about a tenth of a request's CPU.
        app.router.routes.extend(router.routes)
    install_error_handlers(app)
    document_bearer_auth(app)
    return app
