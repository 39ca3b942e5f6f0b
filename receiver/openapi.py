"""The OpenAPI 3.1 document, built from the declared ``Operation``s and pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from receiver.apidoc import Operation

_DESCRIPTIONS = {
    200: "OK",
    400: "not JSON",
    401: "not authenticated",
    404: "not found",
    409: "conflict",
    413: "body too large",
    415: "not JSON content",
    422: "invalid input",
    503: "storage unavailable; retry after Retry-After seconds",
}


def build_document(operations: list[Operation]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    paths: dict[str, Any] = {}
    for op in operations:
        if not op.documented:
            continue
        entry: dict[str, Any] = {
            "summary": op.summary,
            "operationId": op.method
            + "_"
            + "_".join(part.strip("{}") for part in op.path.strip("/").split("/")),
            "tags": list(op.tags),
            "parameters": [param.to_openapi() for param in op.params],
            "responses": {},
        }
        if op.authenticated:
            entry["security"] = [{"bearer": []}]
        if op.request_model is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(op.request_model)}},
            }
        elif op.request_body is not None:
            entry["requestBody"] = op.request_body
        for status, model in op.responses.items():
            response: dict[str, Any] = {"description": _DESCRIPTIONS.get(status, str(status))}
            if model is not None:
                response["content"] = {"application/json": {"schema": ref(model)}}
            elif status in op.response_media:
                response["content"] = {op.response_media[status]: {"schema": {"type": "string"}}}
            if status == 503:
                response["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
            entry["responses"][str(status)] = response
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "runflow-receiver",
            "version": "0.1.0",
            "description": "Receives Runflow callbacks and answers failure analytics.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
