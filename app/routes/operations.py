"""For those who run the service: its metrics, in Prometheus' format (only with METRICS_ENABLED)."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Response

from app.deps import MetricsReader
from app.metrics import render

router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False, dependencies=[MetricsReader])
async def metrics(accept: Annotated[str | None, Header()] = None) -> Response:
    # Every worker's files are read: off the event loop.
    body, content_type = await asyncio.to_thread(render, accept)
    return Response(body, media_type=content_type)
