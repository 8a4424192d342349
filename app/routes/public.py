"""Routes anyone may call."""

from fastapi import APIRouter

from app.auth import User
from app.database import database_is_up
from app.deps import EngineDep, OptionalPrincipal
from app.errors import DatabaseUnavailable
from app.routes.responses import errors
from app.schemas import HealthOut, Message, PublicDataOut

router = APIRouter(tags=["public"])


@router.get("/", summary="Welcome message")
async def root() -> Message:
    return Message(message="Welcome to the Picads API. Documentation: /docs")


@router.get("/health", summary="Liveness and database check", responses=errors(503))
async def health(engine: EngineDep) -> HealthOut:
    if not await database_is_up(engine):
        raise DatabaseUnavailable
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
