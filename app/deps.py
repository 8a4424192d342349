"""Every dependency routes use, as aliases, so a route's signature reads like a sentence:
`user: CurrentUser, db: Db`. The app's long-lived resources live in one typed `Resources`, made at start-up."""

from __future__ import annotations

import functools
import hmac
import inspect
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

import asyncpg
import stripe
from fastapi import Depends, Header, Request
from fastapi.routing import APIRoute
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.auth import Principal, ServiceCaller, TokenVerifier, User
from app.config import Settings
from app.database import HotPool, driver_transaction, session_transaction
from app.errors import AppError, Unauthorized
from app.services.billing.stripe_api import WEBHOOKS_NOT_CONFIGURED, StripeConnection, StripeNotConfigured
from app.services.billing.webhook import verify_event
from app.services.profiles import refuse_protected_fields


@dataclass(frozen=True, slots=True)
class Resources:
    """What the app opens at start-up and closes at shutdown (`app.state.resources`)."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    driver_pool: HotPool
    verifier: TokenVerifier
    # None without STRIPE_SECRET_KEY: checkout and the portal then answer 503.
    stripe: StripeConnection | None
    user_writes: UserWrites


def resources(request: Request) -> Resources:
    found: Resources = request.app.state.resources
    return found


# Every dependency here is `async def`, even those that do not await: FastAPI runs a plain `def` in a thread pool.


async def _settings(request: Request) -> Settings:
    return resources(request).settings


# --- Who is calling -------------------------------------------------------------------------------------------


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected 'Authorization: Bearer <token>'")
    return token.strip()


async def optional_principal(request: Request) -> Principal | None:
    """The caller when a token is sent; anonymous without one. A token that fails is 401, never anonymous."""
    token = _bearer_token(request)
    if token is None:
        return None
    verifier = resources(request).verifier
    if verifier.is_service_role_key(token):
        return ServiceCaller()
    principal = await verifier.verify(token)
    if isinstance(principal, User):
        request.state.user_id = principal.id  # for the request log
    return principal


# Each of these is one flat function of the request: FastAPI's per-request cost grows with every node of the
# dependency tree, and they run on every authenticated request. /docs learns of them from app/docs.py.


class WrongCaller(AppError):
    status_code = 403


async def require_user_or_service_role(request: Request) -> Principal:
    principal = await optional_principal(request)
    if principal is None:
        raise Unauthorized("missing bearer token")
    return principal


async def require_user(request: Request) -> User:
    principal = await require_user_or_service_role(request)
    if not isinstance(principal, User):
        raise WrongCaller("this endpoint needs a user's token; the service role has no profile")
    return principal


async def require_service_role(request: Request) -> ServiceCaller:
    principal = await require_user_or_service_role(request)
    if not isinstance(principal, ServiceCaller):
        raise WrongCaller("this endpoint needs the service role")
    return principal


async def _metrics_reader(request: Request) -> None:
    """GET /metrics: a bearer equal to METRICS_TOKEN, when one is set (the route exists without one only outside
    production, with no METRICS_PORT)."""
    expected = resources(request).settings.metrics_token
    if expected is None:
        return
    token = _bearer_token(request)
    if token is None:
        raise Unauthorized("missing bearer token: send METRICS_TOKEN")
    if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("wrong metrics token")


# --- What a request carries ---------------------------------------------------------------------------------


async def _refuse_protected_fields(request: Request) -> None:
    """Credits and billing fields in a profile body are 403, before the body's model turns them into 422s."""
    body = await request.body()  # already read (and checked to be JSON) by FastAPI: cached
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            return  # FastAPI answers a malformed body itself
        refuse_protected_fields(data)


async def _verified_event(
    request: Request, signature: Annotated[str | None, Header(alias="Stripe-Signature")] = None
) -> dict[str, Any]:
    secret = resources(request).settings.stripe_webhook_secret
    if secret is None:
        raise StripeNotConfigured(WEBHOOKS_NOT_CONFIGURED)
    return verify_event(await request.body(), signature, secret.get_secret_value())


# --- Data -----------------------------------------------------------------------------------------------------

_READS = frozenset({"GET", "HEAD"})


class TooManyWrites(AppError):
    status_code = 429
    default_detail = "too many of your requests are changing your balance at once: try again in a moment"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


class UserWrites:
    """At most `limit` balance-changing requests of one user at a time in this process: one account flooding its
    own row lock never holds more than a small share of the pool's connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running: dict[UUID, int] = {}

    def enter(self, user_id: UUID) -> None:
        count = self.running.get(user_id, 0)
        if count >= self.limit:
            raise TooManyWrites
        self.running[user_id] = count + 1

    def leave(self, user_id: UUID) -> None:
        count = self.running.pop(user_id) - 1
        if count:
            self.running[user_id] = count


class DbRoute(APIRoute):
    """A route whose endpoint takes `db: Db`. Once FastAPI has resolved everything else (the caller checked, the
    body valid), the route opens the request's transaction on a connection from the hot paths' pool, hands it to
    the endpoint, and commits (or rolls back) and gives the connection back when the endpoint returns, before
    the response is sent: the contract of a `yield` dependency with scope="function", without FastAPI's
    per-request machinery for dependencies, which on these paths costs more than the query (docs/benchmarks.md)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, _with_connection(endpoint), **kwargs)


def _with_connection(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(endpoint, eval_str=True)
    if "db" not in signature.parameters:
        return endpoint

    @functools.wraps(endpoint)
    async def with_connection(_db_request: Request, **values: Any) -> Any:
        found = resources(_db_request)
        read_only = _db_request.method in _READS
        # A user's balance-changing request takes one of their slots first (GETs and the service role take none).
        user_id: UUID | None = None if read_only else getattr(_db_request.state, "user_id", None)
        if user_id is not None:
            found.user_writes.enter(user_id)
        try:
            async with driver_transaction(found.driver_pool, read_only=read_only) as db:
                return await endpoint(db=db, **values)
        finally:
            if user_id is not None:
                found.user_writes.leave(user_id)

    # What FastAPI reads: the endpoint's own parameters, but `db`, and the request the connection is opened for.
    parameters = [parameter for name, parameter in signature.parameters.items() if name != "db"]
    request = inspect.Parameter("_db_request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
    with_connection.__signature__ = signature.replace(parameters=[*parameters, request])  # type: ignore[attr-defined]
    return with_connection


async def _outside_a_db_route(request: Request) -> Any:
    raise RuntimeError("Db is given to the endpoints of DbRoute routes only")


def check_db_routes(routes: list[Any]) -> None:
    """At start-up: a route taking `Db` outside a DbRoute would have no connection."""
    for route in routes:
        if not isinstance(route, APIRoute) or isinstance(route, DbRoute):
            continue
        if any(dependency.call is _outside_a_db_route for dependency in route.dependant.dependencies):
            raise RuntimeError(f"{route.path} takes Db: its router needs APIRouter(route_class=DbRoute)")


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    async with session_transaction(resources(request).sessions) as session:
        yield session


async def _engine(request: Request) -> AsyncEngine:
    return resources(request).engine


async def _sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    return resources(request).sessions


async def _optional_stripe(request: Request) -> stripe.StripeClient | None:
    connection = resources(request).stripe
    return connection.client if connection is not None else None


async def _stripe(request: Request) -> stripe.StripeClient:
    connection = resources(request).stripe
    if connection is None:
        raise StripeNotConfigured
    return connection.client


OptionalPrincipal = Annotated[Principal | None, Depends(optional_principal)]
CurrentUser = Annotated[User, Depends(require_user)]
ServiceRole = Annotated[ServiceCaller, Depends(require_service_role)]
UserOrServiceRole = Annotated[Principal, Depends(require_user_or_service_role)]
SettingsDep = Annotated[Settings, Depends(_settings)]
# The hot paths' connection (asyncpg's pool, plain SQL), in the request's one transaction: committed before the
# response goes out, so a failed commit is never answered with 2xx. Given by DbRoute routes (see there).
Db = Annotated[asyncpg.Connection, Depends(_outside_a_db_route)]
# An ORM session in the request's one transaction, under the same contract.
SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]
# For the rare request that must not hold one transaction throughout (one that waits on Stripe).
SessionFactoryDep = Annotated[async_sessionmaker[AsyncSession], Depends(_sessionmaker)]
StripeDep = Annotated[stripe.StripeClient, Depends(_stripe)]
# For the webhook, whose events about payments need Stripe's API and others do not.
OptionalStripe = Annotated[stripe.StripeClient | None, Depends(_optional_stripe)]
EngineDep = Annotated[AsyncEngine, Depends(_engine)]
# Makes a balance-changing request safe to retry: per user, the same key and body get the first answer.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Any unique string (a UUID): a retry with the same key and body is answered, not charged again",
    ),
]
# A Stripe event whose signature was checked on the raw body.
VerifiedEvent = Annotated[dict[str, Any], Depends(_verified_event)]
NoProtectedFields = Depends(_refuse_protected_fields)
MetricsReader = Depends(_metrics_reader)
