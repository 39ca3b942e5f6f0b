"""Schemathesis over every operation of /openapi.json, with ingest bodies signed.

Each operation gets its share of ``RECEIVER_FUZZ_CASES`` (default: a few hundred in all, for
a quick ``pytest -m fuzz``; ``.ci/fuzz`` runs at least 10,000), positive and negative cases
mixed. Every answer must be documented (status, content type, body schema), none a 500, and
a delivery an answer names must read back from GET /deliveries/{id}. Webhook bodies are
signed with the test secret after serialisation, so fuzzed callbacks reach parsing, the
archive and the merge instead of stopping at 401; query operations carry the bearer token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation.modes import GenerationMode

from receiver.ingest.signature import sign
from receiver.openapi import build_document
from receiver.routes import all_operations
from tests.support.builders import API_TOKEN, SIGNING_SECRET, body_of, signed_headers, varied_runs
from tests.support.database import truncate_all
from tests.support.fuzzing import (
    CASES_ENV,
    InProcess,
    Tally,
    budget,
    fuzz_client,
    read_back_problem,
)
from tests.support.hostile import deliveries, to_bytes

pytestmark = pytest.mark.fuzz

DOCUMENT = build_document(all_operations())
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
OPERATIONS: dict[str, Any] = {
    op.label: op
    for op in (result.ok() for result in SCHEMA.get_all_operations())  # type: ignore[union-attr]
}
LABELS: list[str] = list(OPERATIONS)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
# An operation with nothing to vary has only a handful of distinct cases.
FIXED_SHARE = 20
SEEDED = varied_runs(30, seed=11)
RULE = {
    "name": "fuzz-rule",
    "metric": "failure_count",
    "threshold": 3,
    "targets": [{"url": "http://127.0.0.1:9/hook", "secret": "s"}],
}
# Path parameters that name something stored, so reads and changes of it are fuzzed too.
KNOWN_PATH_VALUES: dict[str, list[Any]] = {
    "run_id": [doc["id"] for doc in SEEDED[:5]],
    "name": [RULE["name"]],
    "delivery_id": list(range(1, 31)),
}


def _has_inputs(label: str) -> bool:
    method, path = label.split(" ", 1)
    entry = DOCUMENT["paths"][path][method.lower()]
    return bool(entry.get("parameters") or entry.get("requestBody"))


def share(label: str) -> int:
    """This operation's part of the total case budget."""
    total = budget(CASES_ENV, 400)
    varied = [name for name in OPERATIONS if _has_inputs(name)]
    if not _has_inputs(label):
        return FIXED_SHARE
    rest = max(total - FIXED_SHARE * (len(OPERATIONS) - len(varied)), len(varied))
    return math.ceil(rest / len(varied))


@pytest.fixture(scope="module")
def fuzz_app(database_url) -> Iterator[InProcess]:
    import asyncio

    asyncio.run(truncate_all(database_url))
    with fuzz_client(database_url) as client:
        for doc in SEEDED:
            body = body_of(doc)
            answer = client.post("/webhooks/runflow", content=body, headers=signed_headers(body))
            assert answer.status_code == 200
        created = client.post(
            "/alerts/rules", json=RULE, headers={"authorization": f"Bearer {API_TOKEN}"}
        )
        assert created.status_code == 201
        yield client


def _request(
    case: Any, hostile: bytes | None
) -> tuple[str, str, dict[str, str], Any, bytes | None]:
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    headers = {str(k): str(v) for k, v in (kwargs.get("headers") or {}).items()}
    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    headers["authorization"] = f"Bearer {API_TOKEN}"
    body: bytes | None = None
    if "json" in kwargs:
        body = json.dumps(kwargs["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        body = data if isinstance(data, bytes) else str(data).encode()
    if hostile is not None:
        body = hostile
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        headers["Content-Type"] = "application/json"
    if case.operation.path == "/webhooks/runflow" and body is not None:
        for name in [k for k in headers if k.lower() == "runflow-signature"]:
            del headers[name]
        headers["Runflow-Signature"] = sign(body, SIGNING_SECRET)
    return kwargs["method"], kwargs["url"], headers, kwargs.get("params"), body


def _strategy(label: str) -> st.SearchStrategy[tuple[Any, bytes | None]]:
    """Cases (and, for the webhook, sometimes a hostile Runflow delivery as the body)."""
    operation = OPERATIONS[label]
    positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    plain = positive.map(lambda case: (case, None))
    if not _has_inputs(label):
        return plain
    negative = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
    mixed = [plain, plain, negative.map(lambda case: (case, None))]
    known = [name for name in KNOWN_PATH_VALUES if "{" + name + "}" in operation.path]
    if known:
        values = st.fixed_dictionaries({n: st.sampled_from(KNOWN_PATH_VALUES[n]) for n in known})
        mixed.append(st.tuples(positive, values).map(_at_known_path))
        mixed.append(st.tuples(positive, values).map(_at_known_path))
    if operation.path == "/webhooks/runflow":
        # A schema of {"type": "object"} alone never names a run: these reach the merge.
        mixed.append(st.tuples(positive, deliveries().map(to_bytes)))
        mixed.append(st.tuples(positive, deliveries().map(to_bytes)))
    return st.one_of(*mixed)


def _at_known_path(drawn: tuple[Any, dict[str, Any]]) -> tuple[Any, None]:
    case, values = drawn
    case.path_parameters = {**(case.path_parameters or {}), **values}
    return case, None


def _deletes_last(label: str) -> tuple[bool, str]:
    """Deleting the seeded rule comes last, so reading and changing it find it."""
    return label.startswith("DELETE"), label


ORDERED = sorted(LABELS, key=_deletes_last)


@pytest.mark.parametrize("label", ORDERED)
def test_fuzzed_operation_answers_are_documented_and_never_500(label, fuzz_app):
    tally = Tally("schemathesis", label)

    @settings(
        max_examples=share(label),
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(drawn=_strategy(label))
    def run(drawn: tuple[Any, bytes | None]) -> None:
        case, hostile = drawn
        method, url, headers, params, body = _request(case, hostile)
        try:
            response = fuzz_app.request(method, url, headers=headers, params=params, content=body)
        except (UnicodeEncodeError, ValueError):
            return  # not sendable over HTTP at all (a header that is not latin-1)
        problem = None
        try:
            case.validate_response(response, checks=CHECKS)
        # FailureGroup is a BaseExceptionGroup: ``except Exception`` would let it through.
        except (Failure, FailureGroup) as exc:  # a check failure, described for the report
            problem = f"{type(exc).__name__}: {str(exc)[:800]}"
        problem = problem or read_back_problem(fuzz_app, response)
        tally.record(response, problem, f"{method} {url} params={params}", body)

    run()
    tally.write()
    assert tally.cases > 0, f"{label}: no case was sent"
    assert not tally.failures, tally.verdict()
