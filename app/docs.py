"""The API's description: the OpenAPI document with the bearer scheme, and the /docs and /redoc pages that
show it, with Swagger UI and ReDoc served from this server (the fastapi-offline package ships them), so the
docs work without internet access."""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

from app.deps import optional_principal, require_service_role, require_user, require_user_or_service_role

# The HTML pages (they run scripts, so they get the relaxed security headers) and where their assets are served.
DOCS_PATHS = ("/docs", "/redoc")
ASSETS_PATH = "/docs/assets"
ASSETS = Path(str(files("fastapi_offline") / "static"))
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


def serve_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc (ReDoc), with their scripts, styles and icon from ASSETS_PATH."""
    assert app.openapi_url is not None
    openapi_url = app.openapi_url
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get(DOCS_PATHS[0], include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            # No badge from Swagger's online validator: nothing leaves this server.
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})},
        )

    @app.get(DOCS_PATHS[1], include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )
