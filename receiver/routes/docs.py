"""``GET /openapi.json``: the API document, built once from the app's own operations."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from receiver.apidoc import Operation
from receiver.openapi import build_document
from receiver.responses import ORJSONResponse


async def openapi_json(request: Request) -> Response:
    document: dict[str, Any] | None = getattr(request.app.state, "openapi", None)
    if document is None:
        document = build_document(request.app.state.operations)
        request.app.state.openapi = document
    return ORJSONResponse(document)


operations = [
    Operation(
        "/openapi.json",
        "get",
        "This document",
        {200: None},
        endpoint=openapi_json,
        authenticated=False,
        documented=False,
    ),
]
