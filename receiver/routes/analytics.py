"""``/analytics/*``: failures, timeseries, durations and costs over a created_at window."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from receiver import analytics
from receiver.apidoc import FILTER_PARAMS, Operation, Param, group_by_param
from receiver.errors import InvalidQuery
from receiver.queryparams import parse_filters, parse_group_by, with_default_window
from receiver.resources import resources
from receiver.responses import ORJSONResponse
from receiver.routes.reads import bounded
from receiver.schemas import Costs, Durations, ErrorBody, Failures, Timeseries

_ERRORS: dict[int, type[ErrorBody] | None] = {401: ErrorBody, 422: ErrorBody, 503: ErrorBody}
_WINDOW = " Window: [created_after, created_before), default the last 24 hours, at most 366 days."


@bounded
async def failures(request: Request) -> Response:
    filters = with_default_window(parse_filters(request.query_params))
    group_by = parse_group_by(request.query_params, ["failure_code", "failure_stage"])
    return ORJSONResponse(await analytics.failures(resources(request).reader, filters, group_by))


@bounded
async def timeseries(request: Request) -> Response:
    filters = with_default_window(parse_filters(request.query_params))
    bucket = request.query_params.get("bucket", "hour")
    if bucket not in analytics.BUCKETS:
        raise InvalidQuery(
            f"bucket must be one of {', '.join(analytics.BUCKETS)}", [{"param": "bucket"}]
        )
    group_by = parse_group_by(request.query_params, [], most=1)
    result = await analytics.timeseries(resources(request).reader, filters, bucket, group_by)
    return ORJSONResponse(result)


@bounded
async def durations(request: Request) -> Response:
    filters = with_default_window(parse_filters(request.query_params))
    group_by = parse_group_by(request.query_params, ["model"])
    return ORJSONResponse(await analytics.durations(resources(request).reader, filters, group_by))


@bounded
async def costs(request: Request) -> Response:
    filters = with_default_window(parse_filters(request.query_params))
    group_by = parse_group_by(request.query_params, ["model"])
    return ORJSONResponse(await analytics.costs(resources(request).reader, filters, group_by))


FAILURES = Operation(
    "/analytics/failures",
    "get",
    "Failed runs by failure code and stage." + _WINDOW,
    {200: Failures, **_ERRORS},
    endpoint=failures,
    params=(*FILTER_PARAMS, group_by_param("failure_code,failure_stage")),
    tags=("analytics",),
)

TIMESERIES = Operation(
    "/analytics/timeseries",
    "get",
    "Runs per bucket by terminal status, zero-filled." + _WINDOW,
    {200: Timeseries, **_ERRORS},
    endpoint=timeseries,
    params=(
        *FILTER_PARAMS,
        Param("bucket", {"type": "string", "enum": list(analytics.BUCKETS)}, "bucket size"),
        group_by_param(""),
    ),
    tags=("analytics",),
)

DURATIONS = Operation(
    "/analytics/durations",
    "get",
    "Exact duration percentiles (nearest rank) of terminal runs." + _WINDOW,
    {200: Durations, **_ERRORS},
    endpoint=durations,
    params=(*FILTER_PARAMS, group_by_param("model")),
    tags=("analytics",),
)

COSTS = Operation(
    "/analytics/costs",
    "get",
    "Run counts and summed cost (decimal strings)." + _WINDOW,
    {200: Costs, **_ERRORS},
    endpoint=costs,
    params=(*FILTER_PARAMS, group_by_param("model")),
    tags=("analytics",),
)

operations = [FAILURES, TIMESERIES, DURATIONS, COSTS]
