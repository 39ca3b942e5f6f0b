"""Endpoints declared once: each ``Operation`` is both the served route and its OpenAPI entry.

Each route module lists its ``operations``; ``Operation.route()`` wraps the handler so an
authenticated operation checks the bearer token and accepts exactly the query parameters it
documents. The document and what is served therefore cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.auth import require_token
from receiver.queryparams import FILTER_COLUMNS, check_known

Handler = Callable[[Request], Awaitable[Response]]

STRING_LIST = {"type": "array", "items": {"type": "string"}}


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    description: str
    location: str = "query"
    required: bool = False

    def to_openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "in": self.location,
            "required": self.required or self.location == "path",
            "description": self.description,
            "schema": self.schema,
        }
        if self.schema.get("type") == "array":
            out["style"], out["explode"] = "form", True
        return out


@dataclass(frozen=True)
class Operation:
    """One endpoint: its handler, and everything the OpenAPI document says about it."""

    path: str
    method: str
    summary: str
    responses: dict[int, type[BaseModel] | None]
    endpoint: Handler
    params: tuple[Param, ...] = ()
    authenticated: bool = True
    request_body: dict[str, Any] | None = None
    request_model: type[BaseModel] | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    # Off for endpoints outside the API document (the document itself).
    documented: bool = True
    # Off where senders may add their own query string (the webhook's callback_url).
    strict_query: bool | None = None
    # Media types of answers that are not JSON models (an HTML page), by status.
    response_media: dict[int, str] = field(default_factory=dict)

    def query_names(self) -> set[str]:
        return {p.name for p in self.params if p.location == "query"}

    def route_path(self) -> str:
        """The path with Starlette converters for integer path parameters."""
        path = self.path
        for param in self.params:
            if param.location == "path" and param.schema.get("type") == "integer":
                path = path.replace("{" + param.name + "}", "{" + param.name + ":int}")
        return path

    def route(self) -> Route:
        handler = self.endpoint
        strict = self.authenticated if self.strict_query is None else self.strict_query
        authenticated = self.authenticated

        async def endpoint(request: Request) -> Response:
            if authenticated:
                require_token(request)
            if strict:
                check_params(request.query_params, self)
            return await handler(request)

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        return Route(self.route_path(), endpoint, methods=[self.method.upper()])


def check_params(params: QueryParams, operation: Operation) -> None:
    """422 ``invalid_query`` for any query parameter the operation does not document."""
    check_known(params, operation.query_names())


FILTER_PARAMS = (
    *(
        Param(
            name, STRING_LIST, f"only runs whose {name} is one of these (repeat or comma-separate)"
        )
        for name in FILTER_COLUMNS
    ),
    Param(
        "created_after",
        {"type": "string", "format": "date-time"},
        "runs created at or after this time (ISO 8601)",
    ),
    Param(
        "created_before",
        {"type": "string", "format": "date-time"},
        "runs created before this time (ISO 8601)",
    ),
)
PAGE_PARAMS = (
    Param("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "page size (default 50)"),
    Param("cursor", {"type": "string"}, "next_cursor of the previous page"),
)


def group_by_param(default: str) -> Param:
    return Param(
        "group_by",
        {"type": "string"},
        "comma-separated dimensions: failure_code, failure_stage, model, target_type, source,"
        f" status, org_id (default {default or 'none'})",
    )
