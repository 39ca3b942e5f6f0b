"""JSON responses: orjson for speed, and the one error shape every route returns."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

from receiver.errors import ReceiverError, Unavailable


def _default(value: Any) -> Any:
    # Decimals stay exact on the wire: cost is a decimal string, never a float.
    from decimal import Decimal

    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, default=_default)


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(error: ReceiverError) -> ORJSONResponse:
    headers = {}
    if isinstance(error, Unavailable):
        headers["Retry-After"] = str(error.retry_after_seconds)
    return ORJSONResponse(error.to_body(), status_code=error.status_code, headers=headers)
