"""``POST /webhooks/runflow``: read the body under the cap and a deadline, hand it to ingest.

Requests refused before the signature is known good (too large, too slow, badly signed) are
anyone's to send: they are counted in ``/metrics`` and logged at a bounded rate with clipped
values, and leave no row anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from receiver import ingest, metrics
from receiver.apidoc import Operation, Param
from receiver.db import DATABASE_DOWN
from receiver.errors import (
    HeadersTooLarge,
    InvalidSignature,
    PayloadTooLarge,
    ReceiverError,
    RequestTimeout,
    Unavailable,
)
from receiver.ingest import RawDelivery
from receiver.ingest.archive import clipped
from receiver.logs import access_fields, mark_logged
from receiver.resources import resources
from receiver.responses import ORJSONResponse, error_response
from receiver.schemas import ErrorBody, IngestAnswer

log = logging.getLogger(__name__)

# An oversize body is read and thrown away up to this many times the limit, so a sender that
# writes its whole body before reading sees the 413 instead of a reset connection.
DRAIN_FACTOR = 4
REFUSED_CAUSES = frozenset({InvalidSignature.code, PayloadTooLarge.code, RequestTimeout.code})


class RateLimitedLog:
    """At most one line per cause per ``interval`` seconds, saying how many were suppressed."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, cause: str, message: str, *args: object) -> bool:
        now = time.monotonic()
        last = self._last.get(cause)
        if last is not None and now - last < self.interval:
            self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
            return False
        suppressed = self._suppressed.pop(cause, 0)
        self._last[cause] = now
        log.warning(message + " (%d more like it suppressed)", *args, suppressed)
        return True


REFUSAL_LOG = RateLimitedLog()
LOGGED_REQUEST_ID = 128  # characters of Runflow-Request-Id a log line carries


class _TooLarge(Exception):
    def __init__(self, drained: bool) -> None:
        self.drained = drained


async def read_capped(request: Request, limit: int) -> bytes:
    """The body; raises ``_TooLarge`` once it is known to exceed ``limit`` bytes, after
    draining what is left up to ``DRAIN_FACTOR`` times the limit (``drained`` says whether
    the connection is clean enough to answer on)."""
    bound = DRAIN_FACTOR * limit
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        if int(declared) > bound:
            raise _TooLarge(drained=False)
        await _drain(request, 0, bound)
        raise _TooLarge(drained=True)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(drained=await _drain(request, size, bound))
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, size: int, bound: int) -> bool:
    """Read and discard the rest of the body; False when it goes past ``bound``."""
    async for chunk in request.stream():
        size += len(chunk)
        if size > bound:
            return False
    return True


async def receive_runflow(request: Request) -> Response:
    started = time.perf_counter()
    # One line per answer, so a Runflow-Request-Id can be followed to the delivery and run.
    line: dict[str, object] = {
        "request_id": clipped(request.headers.get("runflow-request-id"), LOGGED_REQUEST_ID)
    }
    try:
        response, content = await _receive(request)
        line.update(content)
        line["outcome"] = line.pop("status")
        line["status"] = response.status_code
    except ReceiverError as error:
        if isinstance(error, Unavailable):
            outcome = "unavailable"
        elif error.status_code >= 500:
            outcome = "error"
        else:
            outcome = "rejected"
        metrics.DELIVERIES.labels(outcome, error.code).inc()
        line.update(
            outcome=outcome,
            cause=error.code,
            status=error.status_code,
            delivery_id=error.delivery_id,
        )
        if error.code not in REFUSED_CAUSES:
            raise
        _refused(request, error)
        if isinstance(error, InvalidSignature):
            raise
        # The body was not (all) read: answer, then close rather than parse what follows.
        response = error_response(error)
        response.headers["connection"] = "close"
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
        if line.get("cause") in REFUSED_CAUSES:
            # Anyone can send these: a flood must not flood the log (REFUSAL_LOG is bounded).
            level = logging.DEBUG
        if log.isEnabledFor(level):
            log.log(
                level,
                "delivery %s",
                line.get("outcome"),
                extra={**line, **access_fields(request.scope), "_in_message": ("outcome",)},
            )
            if level >= logging.INFO:
                mark_logged(request.scope)  # this line is also the request's access line
    return response


def _refused(request: Request, error: ReceiverError) -> None:
    metrics.REFUSED.labels(error.code).inc()
    REFUSAL_LOG.warning(
        error.code,
        "refused webhook request: %s request_id=%s",
        error.code,
        clipped(request.headers.get("runflow-request-id"), LOGGED_REQUEST_ID),
    )


async def _receive(request: Request) -> tuple[Response, dict[str, object]]:
    res = resources(request)
    settings = res.settings
    received_at = datetime.now(UTC)
    # The protocol (receiver.server) refuses oversize heads that arrive in pieces; ones that
    # arrive in one read are complete before it looks, so they are measured here.
    head = sum(len(name) + len(value) + 4 for name, value in request.scope["headers"])
    if head > settings.max_header_bytes:
        raise HeadersTooLarge(f"request headers exceed {settings.max_header_bytes} bytes")
    headers = {name.lower(): value for name, value in request.headers.items()}
    try:
        async with asyncio.timeout(settings.body_read_timeout_seconds):
            body = await read_capped(request, settings.max_body_bytes)
    except _TooLarge:
        # Past the drain bound the close below cuts the connection with the body unread.
        raise PayloadTooLarge(f"body exceeds {settings.max_body_bytes} bytes") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the body did not arrive within {settings.body_read_timeout_seconds:g} s"
        ) from None
    except ClientDisconnect:
        # Nobody is left to answer; nothing was kept.
        return Response(status_code=400), {"status": "disconnected"}
    result = await ingest.receive(
        res.engine, settings, RawDelivery(body=body, headers=headers, received_at=received_at)
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
        408: ErrorBody,
        413: ErrorBody,
        415: ErrorBody,
        422: ErrorBody,
        500: ErrorBody,
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
