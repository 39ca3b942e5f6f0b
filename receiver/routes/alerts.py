"""``/alerts/rules`` (create, list, read, change, delete) and ``/alerts/events``."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from receiver.alerts import store
from receiver.alerts.rules import Rule, restore_secrets, validate_rule
from receiver.alerts.targets import check_rule_targets, redact_url
from receiver.apidoc import PAGE_PARAMS, Operation, Param
from receiver.errors import Conflict, InvalidQuery, InvalidRule, NotFound
from receiver.queryparams import decode_cursor, encode_cursor, parse_limit
from receiver.resources import resources
from receiver.responses import ORJSONResponse
from receiver.schemas import AlertEventPage, AlertRuleOut, AlertRules, ErrorBody

_ERRORS: dict[int, type[ErrorBody] | None] = {401: ErrorBody, 422: ErrorBody, 503: ErrorBody}
NAME = Param("name", {"type": "string"}, "the rule's name", location="path")


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidRule("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRule("body must be a JSON object")
    return data


async def _with_states(request: Request, rule_id: int, rule: Rule) -> dict[str, Any]:
    states = await store.rule_states(resources(request).engine, rule_id)
    return {"rule": rule.public_definition(), "states": states}


async def _checked(request: Request, rule: Rule) -> Rule:
    """The rule, once its hook targets are known to point outside this network."""
    allow = resources(request).settings.alert_allow_private_targets
    await check_rule_targets([t.url for t in rule.targets], allow_private=allow)
    return rule


async def create_rule(request: Request) -> Response:
    rule = await _checked(
        request, validate_rule(restore_secrets(await _json_object(request), None))
    )
    engine = resources(request).engine
    if await store.get_rule(engine, rule.name) is not None:
        raise Conflict(f"a rule named {rule.name!r} exists; PATCH it instead")
    await store.upsert_rule(engine, rule)
    found = await store.get_rule(engine, rule.name)
    assert found is not None
    return ORJSONResponse(await _with_states(request, *found), status_code=201)


async def list_rules(request: Request) -> Response:
    found = await store.list_rules(resources(request).engine)
    return ORJSONResponse({"items": [await _with_states(request, *item) for item in found]})


async def _existing(request: Request) -> tuple[int, Rule]:
    name = request.path_params["name"]
    found = None if "\x00" in name else await store.get_rule(resources(request).engine, name)
    if found is None:
        raise NotFound(f"no alert rule {name!r}")
    return found


async def get_rule(request: Request) -> Response:
    return ORJSONResponse(await _with_states(request, *await _existing(request)))


async def patch_rule(request: Request) -> Response:
    _, rule = await _existing(request)
    changes = await _json_object(request)
    if "name" in changes and changes["name"] != rule.name:
        raise InvalidRule("a rule cannot be renamed; create a new one")
    updated = validate_rule(restore_secrets({**rule.definition(), **changes}, rule))
    await _checked(request, updated)
    engine = resources(request).engine
    await store.upsert_rule(engine, updated)
    found = await store.get_rule(engine, updated.name)
    assert found is not None
    return ORJSONResponse(await _with_states(request, *found))


async def delete_rule(request: Request) -> Response:
    name = request.path_params["name"]
    if "\x00" in name or not await store.delete_rule(resources(request).engine, name):
        raise NotFound(f"no alert rule {request.path_params['name']!r}")
    return Response(status_code=204)


async def list_events(request: Request) -> Response:
    limit = parse_limit(request.query_params)
    after = decode_cursor(request.query_params, (int,))
    rule = request.query_params.get("rule")
    if rule is not None and "\x00" in rule:
        raise InvalidQuery("rule contains a NUL character", [{"param": "rule"}])
    items, more = await store.events_page(
        resources(request).engine,
        rule=rule,
        before_id=None if after is None else after[0],
        limit=limit,
    )
    for item in items:
        for notice in item["notifications"]:
            notice["url"] = redact_url(notice["url"])
    cursor = encode_cursor(items[-1]["id"]) if more else None
    return ORJSONResponse({"items": items, "next_cursor": cursor})


CREATE = Operation(
    "/alerts/rules",
    "post",
    "Create an alert rule",
    {201: AlertRuleOut, 409: ErrorBody, **_ERRORS},
    endpoint=create_rule,
    request_model=Rule,
    tags=("alerts",),
)

LIST = Operation(
    "/alerts/rules",
    "get",
    "Alert rules with the state of each group; hook secrets are shown as ********,"
    " hook URLs as scheme://host/***",
    {200: AlertRules, **_ERRORS},
    endpoint=list_rules,
    tags=("alerts",),
)

GET = Operation(
    "/alerts/rules/{name}",
    "get",
    "One alert rule with its states",
    {200: AlertRuleOut, 404: ErrorBody, **_ERRORS},
    endpoint=get_rule,
    params=(NAME,),
    tags=("alerts",),
)

PATCH = Operation(
    "/alerts/rules/{name}",
    "patch",
    "Change fields of an alert rule; a target secret sent as ******** or a url sent as shown"
    " (scheme://host/***) keeps the stored one",
    {200: AlertRuleOut, 404: ErrorBody, **_ERRORS},
    endpoint=patch_rule,
    params=(NAME,),
    request_body={
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
    tags=("alerts",),
)

DELETE = Operation(
    "/alerts/rules/{name}",
    "delete",
    "Delete an alert rule and its states",
    {204: None, 404: ErrorBody, **_ERRORS},
    endpoint=delete_rule,
    params=(NAME,),
    tags=("alerts",),
)

EVENTS = Operation(
    "/alerts/events",
    "get",
    "State transitions, newest first, each with where its notifications stand",
    {200: AlertEventPage, **_ERRORS},
    endpoint=list_events,
    params=(Param("rule", {"type": "string"}, "only this rule's events"), *PAGE_PARAMS),
    tags=("alerts",),
)

operations = [CREATE, LIST, GET, PATCH, DELETE, EVENTS]
