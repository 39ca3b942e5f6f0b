"""``GET /reconciliation/status``: what the reconciler last did and how far it has listed."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from receiver.apidoc import Operation
from receiver.reconciliation import reconcile_status
from receiver.resources import resources
from receiver.responses import ORJSONResponse
from receiver.schemas import ErrorBody, ReconciliationStatus


async def status(request: Request) -> Response:
    res = resources(request)
    body = ReconciliationStatus(**await reconcile_status(res.settings, res.reads))
    return ORJSONResponse(body.model_dump(mode="json"))


STATUS = Operation(
    "/reconciliation/status",
    "get",
    "Reconciliation with Runflow's API: last pass, watermark, runs imported and re-fetched",
    {200: ReconciliationStatus, 401: ErrorBody, 422: ErrorBody, 503: ErrorBody},
    endpoint=status,
    tags=("reconciliation",),
)

operations = [STATUS]
