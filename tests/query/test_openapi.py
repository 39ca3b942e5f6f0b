"""/openapi.json describes every route, and a fuzz run finds no 500s and no undocumented shapes."""

from __future__ import annotations

import asyncio
import re

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from starlette.routing import Route

from receiver.app import create_app
from receiver.openapi import build_document
from receiver.routes import all_operations
from receiver.settings import Settings
from tests.support.builders import API_TOKEN, SIGNING_SECRET, auth, post_delivery, varied_runs
from tests.support.database import truncate_all
from tests.support.processes import receiver_env, serving

DOCUMENT = build_document(all_operations())


async def test_openapi_json_is_served_and_lists_every_route(client):
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    app = create_app(Settings(database_url=None))
    served = {
        (route.path.replace(":int", ""), method.lower())
        for route in app.routes
        if isinstance(route, Route) and route.path != "/openapi.json"
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert served == documented


def test_documented_parameters_are_exactly_the_accepted_ones():
    runs = DOCUMENT["paths"]["/runs"]["get"]["parameters"]
    names = {p["name"] for p in runs}
    assert names == {
        "status",
        "failure_code",
        "failure_stage",
        "model",
        "target_type",
        "source",
        "client_ref",
        "batch_id",
        "org_id",
        "created_after",
        "created_before",
        "limit",
        "cursor",
    }


schema = schemathesis.openapi.from_dict(DOCUMENT)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@pytest.fixture(scope="module")
def live_receiver(database_url, tmp_path_factory):
    """A real server on 127.0.0.1 with some data in it, for the fuzzer."""
    import httpx

    asyncio.run(truncate_all(database_url))
    env = receiver_env(
        RECEIVER_DATABASE_URL=database_url,
        RECEIVER_SIGNING_SECRETS=SIGNING_SECRET,
        RECEIVER_API_TOKENS=API_TOKEN,
    )
    with serving(env, tmp_path_factory.mktemp("fuzz"), workers=1) as (base, _):

        async def load() -> None:
            async with httpx.AsyncClient(base_url=base) as client:
                for doc in varied_runs(20, seed=5):
                    await post_delivery(client, doc)

        asyncio.run(load())
        yield base


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_fuzzed_requests_get_documented_answers_and_never_500(case, live_receiver):
    # Generated extra headers that are not HTTP at all (a name with ";", a content-length of
    # letters) are refused by uvicorn's parser with a bare 400 before the app is reached.
    case.headers = {
        name: value
        for name, value in (case.headers or {}).items()
        if _TOKEN.fullmatch(name) and name.lower() not in {"content-length", "transfer-encoding"}
    }
    response = case.call(base_url=live_receiver, headers=auth(), timeout=30)
    # Semantic rejections (a window that ends before it starts, a cursor we never issued) are
    # fine as documented 422s; what must never happen is a 500 or an undocumented answer.
    case.validate_response(
        response,
        checks=[
            checks.not_a_server_error,
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_schema_conformance,
            checks.response_headers_conformance,
        ],
    )
