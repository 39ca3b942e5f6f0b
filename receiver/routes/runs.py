"""``/runs`` and ``/deliveries``: listings, one run, its deliveries, and replay."""

from __future__ import annotations

from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response

from receiver import ingest, queries
from receiver.apidoc import FILTER_PARAMS, PAGE_PARAMS, Operation, Param
from receiver.errors import InvalidQuery, NotFound
from receiver.queryparams import decode_cursor, encode_cursor, parse_filters, parse_limit
from receiver.resources import resources
from receiver.responses import ORJSONResponse
from receiver.routes.reads import bounded
from receiver.schemas import (
    DeliveryDetail,
    DeliveryList,
    DeliveryPage,
    ErrorBody,
    ReplayAnswer,
    RunDetail,
    RunPage,
)
from receiver.vocabulary import DeliveryOutcome

OUTCOMES = tuple(DeliveryOutcome)
MAX_ID = 2**63 - 1
RUN_ID = Param("run_id", {"type": "string"}, "the Runflow run id", location="path")
DELIVERY_ID = Param(
    "delivery_id", {"type": "integer", "minimum": 0}, "a delivery id", location="path"
)
_ERRORS: dict[int, type[ErrorBody] | None] = {401: ErrorBody, 422: ErrorBody, 503: ErrorBody}


def _text_path(request: Request, name: str) -> str:
    value: str = request.path_params[name]
    if "\x00" in value:
        raise NotFound(f"no run {value!r}")
    return value


def _id_path(request: Request) -> int:
    delivery_id: int = request.path_params["delivery_id"]
    if delivery_id > MAX_ID:
        raise NotFound(f"delivery {delivery_id} not found")
    return delivery_id


@bounded
async def list_runs(request: Request) -> Response:
    filters = parse_filters(request.query_params)
    limit = parse_limit(request.query_params)
    after = decode_cursor(request.query_params, (datetime, str))
    items, last = await queries.list_runs(
        resources(request).reads,
        filters,
        limit=limit,
        after=after,
    )
    cursor = encode_cursor(*last) if last else None
    return ORJSONResponse({"items": items, "next_cursor": cursor})


@bounded
async def get_run(request: Request) -> Response:
    run_id = _text_path(request, "run_id")
    run = await queries.get_run(resources(request).reads, run_id)
    if run is None:
        raise NotFound(f"no run {run_id!r}")
    return ORJSONResponse(run)


@bounded
async def run_deliveries(request: Request) -> Response:
    run_id = _text_path(request, "run_id")
    limit = parse_limit(request.query_params)
    after = decode_cursor(request.query_params, (datetime, int))
    engine = resources(request).reads
    run = await queries.get_run(engine, run_id)
    if run is None:
        raise NotFound(f"no run {run_id!r}")
    items, last = await queries.run_deliveries(engine, run_id, limit=limit, after=after)
    # The archive keeps whole days back to retained_since; a run first heard of before that
    # has had its older deliveries dropped (its row is whole: pruning never changes a run).
    since = await queries.archive_retained_since(engine)
    aged_out = since is not None and run["first_received_at"] < since
    return ORJSONResponse(
        {
            "items": items,
            "next_cursor": encode_cursor(*last) if last else None,
            "aged_out": aged_out,
            "retained_since": since,
        }
    )


@bounded
async def list_deliveries(request: Request) -> Response:
    outcomes = [
        v.strip()
        for raw in request.query_params.getlist("outcome")
        for v in raw.split(",")
        if v.strip()
    ]
    for outcome in outcomes:
        if outcome not in OUTCOMES:
            raise InvalidQuery(
                f"outcome must be one of {', '.join(OUTCOMES)}", [{"param": "outcome"}]
            )
    limit = parse_limit(request.query_params)
    after = decode_cursor(request.query_params, (datetime, int))
    items, last = await queries.list_deliveries(
        resources(request).reads,
        outcomes=outcomes,
        limit=limit,
        after=after,
    )
    return ORJSONResponse({"items": items, "next_cursor": encode_cursor(*last) if last else None})


@bounded
async def get_delivery(request: Request) -> Response:
    delivery_id = _id_path(request)
    found = await queries.get_delivery(resources(request).reads, delivery_id)
    if found is None:
        raise NotFound(f"delivery {delivery_id} not found")
    return ORJSONResponse(found)


async def replay(request: Request) -> Response:
    res = resources(request)
    result = await ingest.replay(
        res.engine,
        _id_path(request),
        enrich=res.settings.enrichment_queueing,
        allow_unsigned=res.settings.allow_unsigned,
    )
    content: dict[str, object] = {"status": result.outcome, "delivery_id": result.delivery_id}
    for name in ("run_id", "batch_id", "duplicate_of", "cause", "cause_detail"):
        if getattr(result, name) is not None:
            content[name] = getattr(result, name)
    return ORJSONResponse(content)


LIST_RUNS = Operation(
    "/runs",
    "get",
    "Runs, newest first, filtered and paged by cursor",
    {200: RunPage, **_ERRORS},
    endpoint=list_runs,
    params=FILTER_PARAMS + PAGE_PARAMS,
    tags=("runs",),
)

GET_RUN = Operation(
    "/runs/{run_id}",
    "get",
    "One run with its node runs",
    {200: RunDetail, 404: ErrorBody, **_ERRORS},
    endpoint=get_run,
    params=(RUN_ID,),
    tags=("runs",),
)

RUN_DELIVERIES = Operation(
    "/runs/{run_id}/deliveries",
    "get",
    "Every delivery that touched a run, oldest first, paged by cursor",
    {200: DeliveryList, 404: ErrorBody, **_ERRORS},
    endpoint=run_deliveries,
    params=(RUN_ID, *PAGE_PARAMS),
    tags=("runs",),
)

LIST_DELIVERIES = Operation(
    "/deliveries",
    "get",
    "Kept deliveries, newest first, by outcome",
    {200: DeliveryPage, **_ERRORS},
    endpoint=list_deliveries,
    params=(
        Param(
            "outcome",
            {"type": "array", "items": {"type": "string", "enum": list(OUTCOMES)}},
            "stored, duplicate or rejected (repeat or comma-separate)",
        ),
        *PAGE_PARAMS,
    ),
    tags=("deliveries",),
)

GET_DELIVERY = Operation(
    "/deliveries/{delivery_id}",
    "get",
    "One kept delivery, with its body when kept",
    {200: DeliveryDetail, 404: ErrorBody, **_ERRORS},
    endpoint=get_delivery,
    params=(DELIVERY_ID,),
    tags=("deliveries",),
)

REPLAY = Operation(
    "/deliveries/{delivery_id}/replay",
    "post",
    "Process a kept delivery again",
    {200: ReplayAnswer, 404: ErrorBody, 409: ErrorBody, **_ERRORS},
    endpoint=replay,
    params=(DELIVERY_ID,),
    tags=("deliveries",),
)

operations = [LIST_RUNS, GET_RUN, RUN_DELIVERIES, LIST_DELIVERIES, GET_DELIVERY, REPLAY]
