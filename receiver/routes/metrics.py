"""``GET /metrics``: Prometheus exposition (see ``receiver.metrics`` for where each comes from)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.apidoc import Operation
from receiver.app import resources


async def metrics(request: Request) -> Response:
    res = resources(request)
    body, content_type = await res.metrics.render(res.engine, request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


operations = [
    Operation(
        "/metrics",
        "get",
        "Prometheus metrics: deliveries by outcome and cause, ingest latency, failures by code"
        " and stage over 24 hours, enrichment queue; summed over every worker process",
        {200: None},
        authenticated=False,
        tags=("operations",),
        text_media_types=("text/plain", "application/openmetrics-text"),
    )
]
routes = [Route("/metrics", metrics, methods=["GET"])]
