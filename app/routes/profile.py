"""The signed-in user's own profile and dashboard."""

from typing import Annotated

from fastapi import APIRouter, Body, Response, status

from app.deps import CurrentUser, Db, DbRoute, NoProtectedFields, SessionDep, SettingsDep
from app.routes.responses import errors
from app.schemas import DashboardOut, DashboardUser, ProfileCreate, ProfileOut, ProfileUpdate
from app.services import credits, profiles

router = APIRouter(tags=["profile"], route_class=DbRoute)


@router.get(
    "/profile",
    summary="Your profile (404 until you create it)",
    response_model=ProfileOut,
    responses=errors(401, 403, 404, 503),
)
async def get_profile(user: CurrentUser, db: Db) -> Response:
    profile = await profiles.read_profile(db, user)
    if profile is None:
        raise profiles.ProfileNotFound
    # Serialized here, once: FastAPI would validate the model again and then serialize it (every page reads this).
    return Response(profile.model_dump_json(), media_type="application/json")


@router.post(
    "/profile",
    summary="Create your profile, or get it if it exists",
    description="201 with the signup credits when created; 200 with the existing profile otherwise.",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": ProfileOut, "description": "The profile already existed"},
        **errors(400, 401, 403, 408, 413, 422, 503),
    },
    dependencies=[NoProtectedFields],
)
async def create_profile(
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    # Optional, documented as ProfileCreate itself (an `| None` body shows as "any of ProfileCreate / null").
    body: Annotated[ProfileCreate, Body(default_factory=ProfileCreate)],
) -> ProfileOut:
    profile, created = await profiles.get_or_create_profile(session, user, body.full_name, settings.signup_grants)
    if not created:
        response.status_code = status.HTTP_200_OK
    return profile


@router.put(
    "/profile",
    summary="Update your display name",
    description="Only `full_name` can be changed here; credits and billing fields are refused with 403.",
    responses=errors(400, 401, 403, 404, 408, 413, 422, 503),
    dependencies=[NoProtectedFields],
)
async def update_profile(user: CurrentUser, session: SessionDep, body: ProfileUpdate) -> ProfileOut:
    return await profiles.update_full_name(session, user.id, body.full_name)


@router.get(
    "/dashboard", summary="Who you are, with your profile, balance and latest entries", responses=errors(401, 403, 503)
)
async def dashboard(user: CurrentUser, db: Db) -> DashboardOut:
    profile = await profiles.read_profile(db, user)
    recent = await credits.list_entries(db, user.id, limit=5, before=None) if profile else []
    return DashboardOut(
        user=DashboardUser(id=user.id, email=user.email, role=user.role),
        profile=profile,
        balance=profile.credits if profile else None,
        held=profile.held if profile else None,
        available=profile.available if profile else None,
        recent_entries=recent,
    )
