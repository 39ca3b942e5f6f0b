"""Hostile Runflow deliveries, signed, posted to the in-process app: never a 500, always a
documented answer, and every delivery an answer names can be read back.

``RECEIVER_FUZZ_PAYLOADS`` cases per shape (default a few dozen for a quick run; the CI
stage runs thousands). Shapes: the per-run envelope, the batch callback, the Run object as the
docs have it and as Runflow's JS SDK types it (SPEC section 1), each with hostile values:
nesting thousands deep, numbers beyond float and int64, datetimes such as
"0001-01-01T00:00:00+01:00", NUL, lone surrogates as JSON escapes, long strings, wrong types
and null ids. The answers are checked against the published /openapi.json, not the code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.core.failures import Failure, FailureGroup

from receiver.openapi import build_document
from receiver.routes import all_operations
from tests.support.builders import auth
from tests.support.database import truncate_all
from tests.support.fuzzing import (
    PAYLOADS_ENV,
    InProcess,
    Tally,
    budget,
    fuzz_client,
    read_back_problem,
    signed_post,
)
from tests.support.hostile import (
    batch_callbacks,
    deliveries,
    envelopes,
    run_objects,
    sdk_runs,
    to_bytes,
)

pytestmark = pytest.mark.fuzz

INGEST = schemathesis.openapi.from_dict(build_document(all_operations()))["/webhooks/runflow"][
    "POST"
]
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
SHAPES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "envelope": envelopes(),
    "batch": batch_callbacks(),
    "run object": run_objects(),
    "sdk run": sdk_runs(),
    "any, with a hostile extra": deliveries(),
}
# What the SPEC (section 3) says ingest answers; anything else is a finding.
INGEST_STATUSES = {200, 400, 401, 413, 415, 422, 503}


@pytest.fixture(scope="module")
def fuzz_app(database_url) -> Iterator[InProcess]:
    asyncio.run(truncate_all(database_url))
    with fuzz_client(database_url) as client:
        yield client


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hostile_deliveries_are_answered_as_documented(shape, fuzz_app):
    tally = Tally("payloads", shape)

    @settings(
        max_examples=budget(PAYLOADS_ENV, 40),
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(doc=SHAPES[shape])
    def run(doc: dict[str, Any]) -> None:
        body = to_bytes(doc)
        response = signed_post(fuzz_app, body)
        problem = None
        if response.status_code not in INGEST_STATUSES:
            problem = f"status {response.status_code} is not an ingest answer"
        case = INGEST.Case(body=doc, media_type="application/json")
        try:
            case.validate_response(response, checks=CHECKS)
        # FailureGroup is a BaseExceptionGroup: ``except Exception`` would let it through.
        except (Failure, FailureGroup) as exc:  # a check failure, described for the report
            problem = problem or f"{type(exc).__name__}: {str(exc)[:800]}"
        problem = problem or read_back_problem(fuzz_app, response)
        if response.status_code == 200 and problem is None:
            problem = _merged_run_problem(fuzz_app, response)
        tally.record(response, problem, "POST /webhooks/runflow", body)

    run()
    tally.write()
    assert tally.cases > 0
    assert not tally.failures, tally.verdict()


def _merged_run_problem(client: InProcess, response: Any) -> str | None:
    """A stored run delivery must leave a run that reads back from GET /runs/{id}."""
    run_id = response.json().get("run_id")
    # An id with a slash or NUL cannot be one path segment of /runs/{run_id}.
    if not isinstance(run_id, str) or "/" in run_id or "\x00" in run_id or not run_id:
        return None
    found = client.get(f"/runs/{quote(run_id, safe='')}", headers=auth())
    if found.status_code != 200:
        return f"stored run {run_id!r} reads back as {found.status_code}: {found.text[:200]}"
    return None
