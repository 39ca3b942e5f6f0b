"""``POST /webhooks/runflow``: read the body under the cap, hand it to ``receiver.ingest``."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response

from receiver import ingest, metrics
from receiver.apidoc import Operation, Param
from receiver.db import DATABASE_DOWN
from receiver.errors import PayloadTooLarge, ReceiverError, Unavailable
from receiver.ingest import ArchiveEntry, RawDelivery
from receiver.resources import resources
from receiver.responses import ORJSONResponse
from receiver.schemas import ErrorBody, IngestAnswer
from receiver.vocabulary import SignatureVerdict

log = logging.getLogger(__name__)


async def read_capped(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


REQUEST_ID_CHARS = 128


async def receive_runflow(request: Request) -> Response:
    started = time.perf_counter()
    # One line per answer, so a Runflow-Request-Id can be followed to the delivery and run.
    line: dict[str, object] = {
        "request_id": (request.headers.get("runflow-request-id") or "")[:REQUEST_ID_CHARS] or None
    }
    try:
        response, content = await _receive(request)
        line.update(content)
        line["outcome"] = line.pop("status")
        line["status"] = response.status_code
    except ReceiverError as error:
        outcome = "unavailable" if isinstance(error, Unavailable) else "rejected"
        metrics.DELIVERIES.labels(outcome, error.code).inc()
        line.update(
            outcome=outcome,
            cause=error.code,
            status=error.status_code,
            delivery_id=error.delivery_id,
        )
        raise
    except DATABASE_DOWN:
        metrics.DELIVERIES.labels("unavailable", Unavailable.code).inc()
        line.update(outcome="unavailable", cause=Unavailable.code, status=Unavailable.status_code)
        raise
    except Exception:
        metrics.DELIVERIES.labels("error", "internal_error").inc()
        line.update(outcome="error", cause="internal_error", status=500)
        raise
    finally:
        seconds = time.perf_counter() - started
        metrics.INGEST_SECONDS.observe(seconds)
        line["duration_ms"] = round(seconds * 1000, 2)
        status = line.get("status")
        level = logging.INFO if isinstance(status, int) and status < 500 else logging.WARNING
        log.log(
            level, "delivery %s", line.get("outcome"), extra={**line, "_in_message": ("outcome",)}
        )
    return response


async def _receive(request: Request) -> tuple[Response, dict[str, object]]:
    res = resources(request)
    received_at = datetime.now(UTC)
    headers = {name.lower(): value for name, value in request.headers.items()}
    body = await read_capped(request, res.settings.max_body_bytes)
    if body is None:
        error = PayloadTooLarge(f"body exceeds {res.settings.max_body_bytes} bytes")
        entry = ArchiveEntry.of(
            None,
            signature=SignatureVerdict.UNCHECKED,
            received_at=received_at,
            request_id=headers.get("runflow-request-id"),
            headers=ingest.kept_headers(headers),
            content_type=headers.get("content-type"),
        )
        raise await ingest.archive_rejection(res.engine, entry, error, keep_body=False)
    result = await ingest.receive(
        res.engine, res.settings, RawDelivery(body=body, headers=headers, received_at=received_at)
    )
    content: dict[str, object] = {"status": result.outcome, "delivery_id": result.delivery_id}
    if result.batch_id is not None:
        content["batch_id"] = result.batch_id
    else:
        content["run_id"] = result.run_id
    if result.duplicate_of is not None:
        content["duplicate_of"] = result.duplicate_of
    metrics.DELIVERIES.labels(result.outcome, "").inc()
    metrics.record_terminal(result.reached_terminal)
    return ORJSONResponse(content), content


INGEST = Operation(
    "/webhooks/runflow",
    "post",
    "Receive a Runflow callback (envelope, batch callback or Run object), signed with"
    " Runflow-Signature; answered 2xx only once the delivery is durable",
    {
        200: IngestAnswer,
        400: ErrorBody,
        401: ErrorBody,
        413: ErrorBody,
        415: ErrorBody,
        422: ErrorBody,
        503: ErrorBody,
    },
    endpoint=receive_runflow,
    params=(
        Param(
            "Runflow-Signature",
            {"type": "string"},
            "lowercase hex HMAC-SHA256 of the raw body, keyed with the callback secret",
            location="header",
        ),
    ),
    authenticated=False,
    request_body={
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
    tags=("ingest",),
    strict_query=False,
)

operations = [INGEST]
