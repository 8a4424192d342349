"""The API's description: the OpenAPI document with the bearer scheme, for /docs and /redoc."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from app.deps import optional_principal, require_service_role, require_user, require_user_or_service_role

SECURITY_SCHEME = "SupabaseBearer"
_REQUIRED: list[dict[str, list[str]]] = [{SECURITY_SCHEME: []}]
# Which operations take a token: required for users and the service role, optional for `OptionalPrincipal`.
_SECURITY_OF: dict[Callable[..., Any], list[dict[str, list[str]]]] = {
    require_user: _REQUIRED,
    require_service_role: _REQUIRED,
    require_user_or_service_role: _REQUIRED,
    optional_principal: [{}, {SECURITY_SCHEME: []}],
}


def document_bearer_auth(app: FastAPI) -> None:
    """Put the bearer scheme in the OpenAPI document (the Authorize button of /docs) and mark each operation
    that takes a token. Done here rather than with a security sub-dependency, which costs every request."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A Supabase access token (or, for admin routes, the service-role key)",
                }
            }
            for route in app.routes:
                if not isinstance(route, APIRoute) or not route.methods:
                    continue
                calls = [dependency.call for dependency in route.dependant.dependencies]
                security = next((_SECURITY_OF[call] for call in calls if call in _SECURITY_OF), None)
                if security is None:
                    continue
                for method in route.methods:
                    schema["paths"][route.path_format][method.lower()]["security"] = security
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
