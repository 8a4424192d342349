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
    409: "Conflicts with an earlier request",
    413: "The request body is too large",
    422: "The request body or parameters are invalid",
    400: "The body is not valid JSON (or not UTF-8)",
    502: "An upstream service failed",
    503: "The database (or a required service) is unavailable",
}
