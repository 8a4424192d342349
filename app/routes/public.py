"""Routes anyone may call."""

from fastapi import APIRouter

from app.auth import User
from app.deps import EngineDep, OptionalPrincipal
from app.errors import DatabaseUnavailable
from app.routes.responses import errors
from app.schema import SchemaBehind, schema_state
from app.schemas import HealthOut, Message, PublicDataOut

router = APIRouter(tags=["public"])


@router.get("/", summary="Welcome message")
async def root() -> Message:
    return Message(message="Welcome to the Picads API. Documentation: /docs")


@router.get(
    "/health",
    summary="Liveness, database and schema check",
    description="503 while the database is unreachable, or while its schema is behind this code's migrations.",
    responses=errors(503),
)
async def health(engine: EngineDep) -> HealthOut:
    state = await schema_state(engine)
    if state is None:
        raise DatabaseUnavailable
    if state.behind:
        raise SchemaBehind(state.behind_message())
    return HealthOut(status="ok", database="ok")


@router.get(
    "/public-data",
    summary="Public data; with a valid token it also says who you are",
    responses=errors(401),
)
async def public_data(principal: OptionalPrincipal) -> PublicDataOut:
    message = "Public data for everyone"
    if principal is None:
        return PublicDataOut(message=message, authenticated=False)
    if isinstance(principal, User):
        return PublicDataOut(
            message=message, authenticated=True, user_id=principal.id, email=principal.email, role=principal.role
        )
    return PublicDataOut(message=message, authenticated=True, role=principal.role)
