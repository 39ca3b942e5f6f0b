"""``GET /enrichment/status``: how far behind enrichment from Runflow's API is."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from receiver.apidoc import Operation
from receiver.enrichment import queue_status
from receiver.resources import resources
from receiver.responses import ORJSONResponse
from receiver.schemas import EnrichmentStatus, ErrorBody


async def status(request: Request) -> Response:
    res = resources(request)
    body = {"enabled": res.settings.enrichment_queueing, **await queue_status(res.reads)}
    return ORJSONResponse(body)


STATUS = Operation(
    "/enrichment/status",
    "get",
    "Enrichment queue depth, oldest pending item, and failures",
    {200: EnrichmentStatus, 401: ErrorBody, 422: ErrorBody, 503: ErrorBody},
    endpoint=status,
    tags=("enrichment",),
)

operations = [STATUS]
