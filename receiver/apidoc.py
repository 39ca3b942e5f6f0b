"""Route descriptions that drive both parameter checking and the OpenAPI document.

Each route module lists its ``operations``; a handler accepts exactly the query parameters its
operation documents (``check_params``), so the document cannot drift from what is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.datastructures import QueryParams

from receiver.queryparams import FILTER_COLUMNS, check_known

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
    path: str
    method: str
    summary: str
    responses: dict[int, type[BaseModel] | None]
    params: tuple[Param, ...] = ()
    authenticated: bool = True
    request_body: dict[str, Any] | None = None
    request_model: type[BaseModel] | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    # Media types of answers that are not JSON models (an HTML page), by status.
    response_media: dict[int, str] = field(default_factory=dict)

    def query_names(self) -> set[str]:
        return {p.name for p in self.params if p.location == "query"}


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
