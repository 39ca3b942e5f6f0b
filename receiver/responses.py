"""JSON responses: orjson for speed, and the one error shape every route returns."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
from starlette.responses import JSONResponse

from receiver.errors import ReceiverError, Unavailable


def _default(value: Any) -> Any:
    # Decimals stay exact on the wire: cost is a decimal string, never a float.
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _default_slow(value: Any) -> Any:
    # What orjson writes natively, for the standard library's encoder.
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return _default(value)


def dumps(content: Any) -> bytes:
    """JSON bytes of ``content``: orjson, or the standard library for numbers orjson refuses.

    jsonb keeps numbers exactly, so a stored ``1e20`` reads back as an integer beyond the 64
    bits orjson can write; such a (rare) document is written by the slower encoder instead.
    """
    try:
        return orjson.dumps(content, default=_default)
    except TypeError:
        return json.dumps(content, default=_default_slow, ensure_ascii=False).encode()


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(error: ReceiverError) -> ORJSONResponse:
    headers = {}
    if isinstance(error, Unavailable):
        headers["Retry-After"] = str(error.retry_after_seconds)
    return ORJSONResponse(error.to_body(), status_code=error.status_code, headers=headers)
