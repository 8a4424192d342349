"""The benchmark's baseline: the original design, one SQLAlchemy session on a new database connection for every
request (`NullPool`), serving the two benchmarked routes with the app's own token check and services.

    gunicorn baseline_app:app --worker-class uvicorn_worker.UvicornWorker   (from tests/perf, as bench.py runs it)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from app.auth import TokenVerifier, User
from app.config import load_settings
from app.database import SessionQueries, connect_arguments, session_transaction
from app.errors import Unauthorized, install_error_handlers
from app.schemas import BalanceChangeOut, SpendRequest
from app.services import credits, profiles

settings = load_settings()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    url, arguments = connect_arguments(settings, settings.database_url_object)
    engine = create_async_engine(url, poolclass=NullPool, connect_args=arguments)
    verifier = TokenVerifier(settings)
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
    app.state.verifier = verifier
    yield
    await verifier.aclose()
    await engine.dispose()


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    async with session_transaction(request.app.state.sessions) as session:
        yield session


async def _user(request: Request) -> User:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    principal = await request.app.state.verifier.verify(token) if scheme.lower() == "bearer" else None
    if not isinstance(principal, User):
        raise Unauthorized("missing bearer token")
    return principal


Session = Annotated[AsyncSession, Depends(_session, scope="function")]
CurrentUser = Annotated[User, Depends(_user)]
app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/profile")
async def get_profile(user: CurrentUser, session: Session) -> Response:
    profile = await profiles.read_profile(SessionQueries(session), user)
    if profile is None:
        raise profiles.ProfileNotFound
    return Response(profile.model_dump_json(), media_type="application/json")


@app.post("/credits/spend")
async def spend(user: CurrentUser, session: Session, body: SpendRequest) -> BalanceChangeOut:
    entry = await credits.spend(SessionQueries(session), user.id, body.amount, body.reason, None)
    return BalanceChangeOut.of(entry)


install_error_handlers(app)
