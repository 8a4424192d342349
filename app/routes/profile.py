"""The signed-in user's own profile and dashboard."""

from fastapi import APIRouter, Request, Response, status

from app.auth import CurrentUser
from app.database import SessionDep, pooled_connection
from app.errors import NotFound
from app.routes.responses import errors
from app.schemas import CreditEntryOut, DashboardOut, DashboardUser, ProfileCreate, ProfileOut, ProfileUpdate
from app.services import credits, profiles

router = APIRouter(tags=["profile"])


@router.get(
    "/profile",
    summary="Your profile (404 until you create it)",
    response_model=ProfileOut,
    responses=errors(401, 403, 404, 503),
)
async def get_profile(user: CurrentUser, request: Request) -> Response:
    async with pooled_connection(request) as connection:
        profile = await profiles.get_profile(connection, user.id)
    if profile is None:
        raise NotFound(profiles.PROFILE_NOT_FOUND)
    # Serialized here, once: FastAPI would validate the model again and then serialize it (every page reads this).
    return Response(ProfileOut.model_validate(dict(profile)).model_dump_json(), media_type="application/json")


@router.post(
    "/profile",
    summary="Create your profile, or get it if it exists",
    description="201 with the signup credits when created; 200 with the existing profile otherwise.",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": ProfileOut, "description": "The profile already existed"},
        **errors(400, 401, 403, 413, 422, 503),
    },
)
async def create_profile(
    user: CurrentUser, session: SessionDep, request: Request, response: Response, body: ProfileCreate | None = None
) -> ProfileOut:
    full_name = body.full_name if body else None
    signup_credits = request.app.state.settings.signup_credits
    profile, created = await profiles.get_or_create_profile(session, user.id, full_name, signup_credits)
    if not created:
        response.status_code = status.HTTP_200_OK
    return ProfileOut.model_validate(profile)


@router.put(
    "/profile",
    summary="Update your display name",
    description="Only `full_name` can be changed here; credits and billing fields are refused with 403.",
    responses=errors(400, 401, 403, 404, 413, 422, 503),
)
async def update_profile(user: CurrentUser, session: SessionDep, body: ProfileUpdate) -> ProfileOut:
    profile = await profiles.update_full_name(session, user.id, body.full_name)
    return ProfileOut.model_validate(profile)


@router.get(
    "/dashboard", summary="Who you are, with your profile, balance and latest entries", responses=errors(401, 403, 503)
)
async def dashboard(user: CurrentUser, request: Request) -> DashboardOut:
    async with pooled_connection(request) as connection:
        profile = await profiles.get_profile(connection, user.id)
        recent = await credits.list_entries(connection, user.id, limit=5, before=None) if profile else []
    return DashboardOut(
        user=DashboardUser(id=user.id, email=user.email, role=user.role),
        profile=ProfileOut.model_validate(dict(profile)) if profile else None,
        balance=profile["credits"] if profile else None,
        recent_entries=[CreditEntryOut.model_validate(entry) for entry in recent],
    )
