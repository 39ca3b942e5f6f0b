"""Liveness and readiness."""

from __future__ import annotations

from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import Response

from receiver import metrics
from receiver.apidoc import Operation
from receiver.migrations import current_revision, head_revision, state_of
from receiver.resources import resources
from receiver.responses import ORJSONResponse
from receiver.schemas import ErrorBody, Health


async def healthz(request: Request) -> Response:
    """The process is up; touches nothing else."""
    return ORJSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the database answers and its schema is at this code's head or ahead of it."""
    engine = resources(request).engine
    head = head_revision()
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        current = await current_revision(engine)
    except Exception as exc:  # any failure to reach the database means not ready
        return ORJSONResponse(
            {"status": "unavailable", "database": "unreachable", "detail": str(exc)[:200]},
            status_code=503,
        )
    state = state_of(current)
    if state == "behind":
        return ORJSONResponse(
            {"status": "unavailable", "database": "ok", "schema": current, "head": head},
            status_code=503,
        )
    # Ahead: a newer version's migration ran first in a rollout; this code keeps serving.
    body = {"status": "ok", "database": "ok", "schema": current}
    if state == "ahead":
        body.update(schema_state=state, head=head)
    return ORJSONResponse(body)


async def metrics_text(request: Request) -> Response:
    """Prometheus text: counters from every worker, and figures read from the database."""
    res = resources(request)
    return Response(await metrics.render(res.settings, res.engine), media_type=metrics.CONTENT_TYPE)


operations = [
    Operation(
        "/metrics",
        "get",
        "Prometheus metrics (text exposition format)",
        {200: None, 503: ErrorBody},
        endpoint=metrics_text,
        authenticated=False,
    ),
    Operation(
        "/healthz",
        "get",
        "The process is up",
        {200: Health},
        endpoint=healthz,
        authenticated=False,
    ),
    Operation(
        "/readyz",
        "get",
        "The database answers and its schema is at head (or ahead: a newer version migrated)",
        {200: Health, 503: Health},
        endpoint=readyz,
        authenticated=False,
    ),
]
