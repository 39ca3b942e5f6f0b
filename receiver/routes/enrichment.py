"""``GET /enrichment/status``: how far behind enrichment from Runflow's API is."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.apidoc import Operation, check_params
from receiver.app import resources
from receiver.auth import authenticated
from receiver.enrichment import queue_status
from receiver.responses import ORJSONResponse
from receiver.schemas import EnrichmentStatus, ErrorBody

STATUS = Operation(
    "/enrichment/status",
    "get",
    "Enrichment queue depth, oldest pending item, and failures",
    {200: EnrichmentStatus, 401: ErrorBody, 422: ErrorBody, 503: ErrorBody},
    tags=("enrichment",),
)


@authenticated
async def status(request: Request) -> Response:
    check_params(request.query_params, STATUS)
    res = resources(request)
    body = {"enabled": res.settings.enrichment_queueing, **await queue_status(res.engine)}
    return ORJSONResponse(body)


operations = [STATUS]
routes = [Route("/enrichment/status", status, methods=["GET"])]
