"""Errors the API answers with. Each carries its HTTP status and says what happened; one handler turns any of
them into `{"detail": ...}`. The domain errors (ProfileNotFound, InsufficientCredits...) live next to the
service that raises them; here are the base and the errors with headers of their own."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, ClassVar

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.routing import Match

logger = logging.getLogger(__name__)


class AppError(Exception):
    status_code: ClassVar[int] = 500
    default_detail: ClassVar[str] = "internal error"

    def __init__(
        self, detail: str | None = None, *, headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        self.detail = detail if detail is not None else self.default_detail
        self.headers = headers
        # Machine-readable fields answered beside `detail` (e.g. the balance on a 402).
        self.extra = extra or {}
        super().__init__(self.detail)


class Unauthorized(AppError):
    status_code = 401
    default_detail = "invalid token"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class ServiceUnavailable(AppError):
    status_code = 503
    default_detail = "service unavailable"
    # Seconds after which trying again makes sense (Retry-After).
    retry_after: ClassVar[int] = 5

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": str(self.retry_after)})


class DatabaseUnavailable(ServiceUnavailable):
    default_detail = "database unavailable, try again shortly"


class DatabaseBusy(ServiceUnavailable):
    """The database answers, but not in time: every pooled connection stayed in use for DB_POOL_TIMEOUT, or a
    statement ran past DB_STATEMENT_TIMEOUT_MS (slow queries, or locks held elsewhere)."""

    default_detail = "database busy, try again"


class StartupError(Exception):
    """A reason not to start serving, with its fix, said in one line (no traceback): the schema does not match
    the code, no database and no embedded one to start."""


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then what caused it, down the chain: SQLAlchemy's `orig`, `__cause__`, `__context__`."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        yield current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else (current.__cause__ or current.__context__)


_CONNECTION_FAILURES = (
    OSError,
    TimeoutError,
    PoolTimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # server shutting down or starting up
    asyncpg.exceptions.ConnectionDoesNotExistError,
)


# SQLSTATE 57014: a statement cancelled, by statement_timeout or on request.
_QUERY_CANCELED = "57014"


def is_database_busy(exc: BaseException) -> bool:
    """True when the database was reachable but too busy to answer in time, anywhere in the chain."""
    for error in exception_chain(exc):
        if isinstance(error, PoolTimeoutError | DatabaseBusy) or getattr(error, "sqlstate", None) == _QUERY_CANCELED:
            return True
    return False


def is_connection_failure(exc: BaseException) -> bool:
    """True when the database could not be reached (as opposed to a bug in a query), anywhere in the chain."""
    for error in exception_chain(exc):
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        # A cancelled statement is in SQLSTATE class 57 with the server's shutdowns, but its connection is fine.
        if isinstance(error, _CONNECTION_FAILURES) and getattr(error, "sqlstate", None) != _QUERY_CANCELED:
            return True
        if isinstance(error, asyncpg.InterfaceError) and "connection is closed" in str(error):
            return True
    return False


async def _app_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return JSONResponse({"detail": exc.detail, **exc.extra}, status_code=exc.status_code, headers=exc.headers)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if is_database_busy(exc):  # before the connection check: a pool that timed out is busy, not unreachable
        logger.warning("database busy during %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return await _app_error(request, DatabaseBusy())
    if not is_connection_failure(exc):
        raise exc
    logger.warning("database unreachable during %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return await _app_error(request, DatabaseUnavailable())


def _method_not_allowed(routes: Sequence[APIRoute]) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(request: Request, _: Exception) -> JSONResponse:
        # The router reports only the first route matching the path; a path can have several (GET, POST,
        # PUT /profile), and `Allow` must list them all.
        methods = {
            method
            for route in routes
            if route.methods and route.matches(request.scope)[0] != Match.NONE
            for method in route.methods
        }
        return JSONResponse(
            {"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": ", ".join(sorted(methods))}
        )

    return handler


async def _invalid_request(_: Request, exc: Exception) -> JSONResponse:
    """422 with where and why for each problem. The offending input is not echoed back: it can be anything,
    including text no JSON encoder accepts (an unpaired surrogate) or a secret pasted in the wrong field."""
    assert isinstance(exc, RequestValidationError)
    problems = [{"loc": error["loc"], "msg": error["msg"], "type": error["type"]} for error in exc.errors()]
    return JSONResponse({"detail": problems}, status_code=422)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if is_database_busy(exc) or is_connection_failure(exc):  # wrapped in something else (a library's own error)
        return await _database_error(request, exc)
    # Still a JSON answer (the traceback goes to the log, through the server, never to the caller).
    logger.error("unhandled %s during %s %s", type(exc).__name__, request.method, request.url.path)
    return JSONResponse({"detail": "internal error: the request was not completed; try again"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """After the routes are added: the 405 handler lists the methods of the app's routes."""
    routes = [route for route in app.routes if isinstance(route, APIRoute)]
    app.add_exception_handler(405, _method_not_allowed(routes))
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(AppError, _app_error)
    # The hot paths talk to asyncpg directly, so its own errors arrive unwrapped.
    for error in (DBAPIError, PoolTimeoutError, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        app.add_exception_handler(error, _database_error)
