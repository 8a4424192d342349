"""Routes anyone may call."""

from fastapi import APIRouter, Request

from app.auth import OptionalPrincipal, User
from app.database import database_is_up
from app.errors import DATABASE_UNAVAILABLE, ServiceUnavailable
from app.routes.responses import errors
from app.schemas import HealthOut, Message, PublicDataOut

router = APIRouter(tags=["public"])


@router.get("/", summary="Welcome message")
async def root() -> Message:
    return Message(message="Welcome to the Picads API. Documentation: /docs")


@router.get("/health", summary="Liveness and database check", responses=errors(503))
async def health(request: Request) -> HealthOut:
    if not await database_is_up(request.app.state.engine):
        raise ServiceUnavailable(DATABASE_UNAVAILABLE)
    return HealthOut(status="ok", database="ok")


@router.get(
    "/public-data",
    summary="Public data; with a valid token it also says who you are",
    responses=errors(401),
)
async def public_data(principal: OptionalPrincipal) -> PublicDataOut:
    if principal is None:
        return PublicDataOut(message="Public data for everyone", authenticated=False)
    if isinstance(principal, User):
        return PublicDataOut(
            message="Public data for everyone",
            authenticated=True,
            user_id=principal.id,
            email=principal.email,
            role=principal.role,
        )
    return PublicDataOut(message="Public data for everyone", authenticated=True, role=principal.role)
