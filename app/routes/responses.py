"""Error responses shared by the routes' OpenAPI documentation."""

from typing import Any

from app.schemas import ErrorResponse


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": DESCRIPTIONS[code]} for code in codes}


DESCRIPTIONS = {
    401: "Missing, expired or invalid bearer token",
    402: "Not enough credits",
    403: "Not allowed for this caller",
    404: "Not found",
    408: "The request body did not arrive in time (BODY_TIMEOUT)",
    409: "Conflicts with an earlier request",
    413: "The request body is too large",
    422: "The request body or parameters are invalid",
    429: "Too many of your requests are changing your balance at once, or it is busy: retry after Retry-After",
    400: "The body is not valid JSON (or not UTF-8)",
    502: "An upstream service failed",
    503: "The database is unreachable or busy, or a required service is not configured: retry after Retry-After",
}
