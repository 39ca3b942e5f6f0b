"""The one Runflow API client: ids as one encoded segment, headers, errors, retries, back-off."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from receiver.backoff import full_jitter, parse_retry_after
from receiver.runflow_api import (
    ApiKeyRefused,
    InvalidRunId,
    RateLimiter,
    RunflowApiError,
    RunflowClient,
    RunNotFound,
    TransientApiError,
    run_path,
)
from receiver.settings import Settings
from tests.support.builders import run_object
from tests.support.fake_runflow import FakeRunflow, serve_fake

TRAVERSAL = "../../admin/keys?dump=1#"


def api_settings(url: str = "http://runflow.test", **overrides: object) -> Settings:
    values: dict[str, object] = {
        "runflow_api_url": url,
        "runflow_api_key": "rf_test_key",
        "runflow_org_id": "org_42",
        "enrichment_rps": 1000,
        "enrichment_max_attempts": 4,
        "enrichment_backoff_seconds": 0.01,
        "enrichment_backoff_max_seconds": 0.05,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


async def test_a_traversal_run_id_is_requested_as_one_encoded_segment():
    fake = FakeRunflow()
    fake.runs[TRAVERSAL] = run_object(TRAVERSAL)
    with serve_fake(fake) as url:
        async with RunflowClient(api_settings(url)) as client:
            fetched = await client.get_run(TRAVERSAL)
    assert fake.paths == ["/v1/runs/..%2F..%2Fadmin%2Fkeys%3Fdump%3D1%23"]
    assert fetched.document["id"] == TRAVERSAL
    assert fake.requests[TRAVERSAL] == 1


@pytest.mark.parametrize(
    "run_id", ["", "run\x00x", "line\nbreak", "tab\tid", "del\x7f", "c1\x85", ".", "..", "r" * 256]
)
async def test_an_id_that_cannot_form_a_url_raises_before_any_request(run_id):
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    transport = httpx.MockTransport(answer)
    async with RunflowClient(api_settings(), transport=transport) as client:
        with pytest.raises(InvalidRunId) as caught:
            await client.get_run(run_id)
    assert caught.value.reason.startswith("invalid_run_id")
    assert not caught.value.retryable
    assert sent == []


def test_ordinary_ids_keep_their_shape_and_unicode_is_encoded():
    assert run_path("run_01HXYZ-abc.def~") == "/v1/runs/run_01HXYZ-abc.def~"
    assert run_path("r" * 255) == "/v1/runs/" + "r" * 255
    assert run_path("é/ü") == "/v1/runs/%C3%A9%2F%C3%BC"


async def test_every_request_carries_the_key_the_organisation_and_the_base_path():
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"items": [], "next_pq": None, "prev_pq": None})

    settings = api_settings("http://runflow.test/api/")
    async with RunflowClient(settings, transport=httpx.MockTransport(answer)) as client:
        page = await client.list_runs(q="created_at>=2026-11-01T00:00:00+00:00", limit=500)
    assert page.items == [] and page.next_pq is None
    [request] = seen
    assert request.headers["authorization"] == "Bearer rf_test_key"
    assert request.headers["x-organization-id"] == "org_42"
    assert request.url.path == "/api/v1/runs"
    assert dict(request.url.params) == {
        "q": "created_at>=2026-11-01T00:00:00+00:00",
        "sort_by": "created_at:asc",
        "limit": "500",
    }


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, RunNotFound), (401, ApiKeyRefused), (403, ApiKeyRefused), (400, RunflowApiError)],
)
async def test_final_answers_are_not_retried(status, error):
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, json={})

    async with RunflowClient(api_settings(), transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(error) as caught:
            await client.with_retries(lambda: client.get_run("run_1"))
    assert not caught.value.retryable
    assert calls == 1


def _raise(exc: Exception):
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc

    return answer


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (lambda r: httpx.Response(503), "http_503"),
        (lambda r: httpx.Response(429), "http_429"),
        (lambda r: httpx.Response(200, content=b"<html>gateway</html>"), "invalid_json"),
        (_raise(httpx.ReadTimeout("slow")), "timeout"),
        (_raise(httpx.ConnectError("refused")), "ConnectError"),
        (_raise(RuntimeError("surprise")), "unexpected: RuntimeError"),
    ],
)
async def test_every_error_class_is_retried_and_counts_toward_the_limit(answer, reason):
    calls = 0

    def counted(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return answer(request)

    settings = api_settings(enrichment_max_attempts=3)
    async with RunflowClient(settings, transport=httpx.MockTransport(counted)) as client:
        with pytest.raises(TransientApiError) as caught:
            await client.with_retries(lambda: client.get_run("run_1"))
    assert caught.value.reason.startswith(reason)
    assert calls == 3


async def test_a_page_in_another_shape_is_an_error_not_the_last_page():
    # What the old, undocumented reading of the list API expected: it must not pass as "done".
    old = {"items": [run_object("a")], "next_cursor": "2"}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=old))
    async with RunflowClient(api_settings(), transport=transport) as client:
        with pytest.raises(RunflowApiError, match="next_pq"):
            await client.list_runs(q="created_at>=2026-11-01T00:00:00+00:00")


async def test_an_http_date_retry_after_is_honoured():
    fake = FakeRunflow(fail_first=1, fail_status=503)
    fake.runs["r1"] = run_object("r1")
    with serve_fake(fake) as url:
        # Whole seconds only in an HTTP-date: ask for the second after next.
        resume = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        fake.retry_after = format_datetime(resume, usegmt=True)
        settings = api_settings(url, enrichment_backoff_max_seconds=5)
        async with RunflowClient(settings) as client:
            fetched = await client.with_retries(lambda: client.get_run("r1"))
        finished = datetime.now(UTC)
    assert fetched.document["id"] == "r1"
    assert fake.requests["r1"] == 2
    assert finished >= resume - timedelta(milliseconds=50)


def test_retry_after_reads_both_forms():
    now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120", now=now) == 120
    assert parse_retry_after(" 0.5 ", now=now) == 0.5
    assert parse_retry_after("Sun, 01 Nov 2026 12:00:30 GMT", now=now) == 30
    assert parse_retry_after("Sun, 01 Nov 2026 11:00:00 GMT", now=now) == 0  # already past
    for unreadable in (None, "", "soon", "-5", "nan", "inf"):
        assert parse_retry_after(unreadable, now=now) is None


def test_backoff_is_full_jitter_bounded_by_the_cap():
    random.seed(1234)
    for attempt in range(1, 12):
        ceiling = min(10.0, 0.5 * 2 ** (attempt - 1))
        draws = [full_jitter(attempt, base=0.5, cap=10.0) for _ in range(2000)]
        assert all(0 <= d <= ceiling for d in draws)
        # Full jitter: the draws cover the whole range down to zero, not a band near the top.
        assert min(draws) < ceiling * 0.05 and max(draws) > ceiling * 0.95
        mean = sum(draws) / len(draws)
        assert abs(mean - ceiling / 2) < ceiling * 0.05
    # A server's Retry-After is a floor, itself bounded by the cap.
    assert all(full_jitter(1, base=0.5, cap=10.0, retry_after=3) >= 3 for _ in range(200))
    assert all(full_jitter(1, base=0.5, cap=10.0, retry_after=86400) <= 10 for _ in range(200))


async def test_a_stop_cuts_a_retry_wait_short():
    transport = httpx.MockTransport(lambda request: httpx.Response(503))
    settings = api_settings(enrichment_backoff_seconds=30, enrichment_backoff_max_seconds=30)
    stop = asyncio.Event()
    async with RunflowClient(settings, transport=transport) as client:
        asyncio.get_running_loop().call_later(0.2, stop.set)
        started = time.monotonic()
        with pytest.raises(TransientApiError):
            await client.with_retries(lambda: client.get_run("r1"), stop=stop)
    assert time.monotonic() - started < 5


async def test_the_rate_limit_spaces_requests_across_tasks():
    limiter = RateLimiter(50)  # one every 20 ms
    started = time.monotonic()
    await asyncio.gather(*(limiter.acquire() for _ in range(11)))
    assert time.monotonic() - started >= 0.19
