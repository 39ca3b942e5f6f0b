"""What the read routes share: every statement of a request under its statement timeout."""

from __future__ import annotations

import functools

from starlette.requests import Request
from starlette.responses import Response

from receiver.apidoc import Handler
from receiver.queries import bounded_reads
from receiver.resources import resources


def bounded(handler: Handler) -> Handler:
    """``handler`` with its reads cancelled after ``RECEIVER_QUERY_STATEMENT_TIMEOUT_SECONDS``
    (503 ``unavailable`` with Retry-After, not 500)."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        with bounded_reads(resources(request).settings.query_statement_timeout_seconds):
            return await handler(request)

    return endpoint
