"""``GET /reconciliation/status``: what the reconciler last did and how far it has listed."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.apidoc import Operation, check_params
from receiver.app import resources
from receiver.auth import authenticated
from receiver.reconciliation import reconcile_status
from receiver.responses import ORJSONResponse
from receiver.schemas import ErrorBody, ReconciliationStatus

STATUS = Operation(
    "/reconciliation/status",
    "get",
    "Reconciliation with Runflow's API: last pass, watermark, runs imported and re-fetched",
    {200: ReconciliationStatus, 401: ErrorBody, 422: ErrorBody, 503: ErrorBody},
    tags=("reconciliation",),
)


@authenticated
async def status(request: Request) -> Response:
    check_params(request.query_params, STATUS)
    res = resources(request)
    body = ReconciliationStatus(**await reconcile_status(res.settings, res.engine))
    return ORJSONResponse(body.model_dump(mode="json"))


operations = [STATUS]
routes = [Route("/reconciliation/status", status, methods=["GET"])]
