"""A local fake of Runflow's API for enrichment, backfill and reconciliation tests (127.0.0.1).

Serves Run objects (the shape of tests.builders.run_object) at ``GET /v1/runs/{id}`` and
Runflow's documented list API at ``GET /v1/runs``: exactly the parameters ``q`` (one filter
expression, conditions joined by ``AND``), ``sort_by`` (``created_at:asc|desc``), ``limit``
(1..500) and ``pq`` (an opaque cursor); the answer is ``{"items", "next_pq", "prev_pq"}``.
Anything else (``created_after``, ``cursor``, an ``OR``) is answered 400, so a client that
drifts from the documented API fails its tests instead of importing one page.

Failures are injected per test: a number of 429s or 500s first (with a Retry-After, either
form), a delay, 404 for unknown runs. Every request is counted, and the raw path of each one
(as it arrived, before any decoding) is kept in ``paths``.
"""

from __future__ import annotations

import asyncio
import base64
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.processes import serve_in_thread

LIST_PARAMETERS = frozenset({"q", "sort_by", "limit", "pq"})
_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<|=|:)\s*(\S+)\s*$")


def _bad_request(message: str) -> Response:
    body = {"error": {"code": "invalid_request", "message": message}}
    return Response(orjson.dumps(body), 400, media_type="application/json")


def _comparable(field_name: str, value: Any) -> Any:
    if field_name.endswith("_at") and isinstance(value, str):
        return datetime.fromisoformat(value)
    return value


def parse_q(q: str) -> Callable[[dict[str, Any]], bool]:
    """A predicate for ``q``; raises ValueError for what this fake does not understand."""
    conditions = []
    for part in re.split(r"\s+AND\s+", q.strip()) if q.strip() else []:
        if re.search(r"\b(OR|NOT)\b", part):
            raise ValueError("the fake understands only AND")
        match = _CONDITION.match(part)
        if match is None:
            raise ValueError(f"cannot read condition {part!r}")
        name, op, raw = match.groups()
        try:
            value = _comparable(name, raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a datetime") from None
        conditions.append((name, op, value))

    def matches(run: dict[str, Any]) -> bool:
        for name, op, value in conditions:
            have = run.get(name)
            if have is None:
                return False
            have = _comparable(name, have)
            ok = {
                ">=": have >= value,
                "<=": have <= value,
                ">": have > value,
                "<": have < value,
                "=": have == value,
                ":": have == value,
            }[op]
            if not ok:
                return False
        return True

    return matches


def _encode_pq(offset: int, q: str, sort_by: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([offset, q, sort_by])).decode()


def _decode_pq(pq: str, q: str, sort_by: str) -> int:
    offset, pq_q, pq_sort = orjson.loads(base64.urlsafe_b64decode(pq.encode()))
    if (pq_q, pq_sort) != (q, sort_by):
        raise ValueError("pq belongs to another query")
    return int(offset)


@dataclass
class FakeRunflow:
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    api_key: str = "rf_test_key"
    fail_first: int = 0  # answer this many requests with fail_status first
    fail_status: int = 429
    retry_after: str | None = "0.05"
    delay_seconds: float = 0.0  # before answering GET /v1/runs/{id}
    list_delay_seconds: float = 0.0  # before answering a page of GET /v1/runs
    fail_pages_after: int | None = None  # /v1/runs pages served before answering 500 forever
    requests: Counter[str] = field(default_factory=Counter)
    paths: list[str] = field(default_factory=list)  # raw path (and query) of every request
    list_queries: list[dict[str, str]] = field(default_factory=list)
    pages_served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _failing(self) -> bool:
        with self.lock:
            total = sum(self.requests.values())
        return total <= self.fail_first

    def _failure(self) -> Response:
        headers = {"retry-after": self.retry_after} if self.retry_after else {}
        return Response(b"{}", self.fail_status, headers=headers, media_type="application/json")

    def _record(self, request: Request) -> None:
        raw = request.scope["raw_path"].decode("latin-1")
        query = request.scope.get("query_string", b"").decode("latin-1")
        with self.lock:
            self.paths.append(raw + ("?" + query if query else ""))

    async def get_run(self, request: Request) -> Response:
        self._record(request)
        # Route on the raw path: one segment after /v1/runs/, percent-decoded once.
        segment = request.scope["raw_path"].decode("latin-1").removeprefix("/v1/runs/")
        if "/" in segment:
            return Response(b'{"error":"not found"}', 404, media_type="application/json")
        run_id = unquote(segment)
        with self.lock:
            self.requests[run_id] += 1
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return Response(b'{"error":"unauthorized"}', 401, media_type="application/json")
        if self._failing():
            return self._failure()
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        run = self.runs.get(run_id)
        if run is None:
            return Response(b'{"error":"not found"}', 404, media_type="application/json")
        return Response(orjson.dumps(run), 200, media_type="application/json")

    async def list_runs(self, request: Request) -> Response:
        self._record(request)
        with self.lock:
            self.requests["/v1/runs"] += 1
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return Response(b"{}", 401, media_type="application/json")
        params = request.query_params
        unknown = sorted(set(params) - LIST_PARAMETERS)
        if unknown:
            return _bad_request(f"unknown parameters: {', '.join(unknown)}")
        self.list_queries.append(dict(params))
        if self._failing():
            return self._failure()
        if self.fail_pages_after is not None and self.pages_served >= self.fail_pages_after:
            return Response(b"{}", 500, media_type="application/json")
        try:
            limit = int(params.get("limit", "50"))
        except ValueError:
            return _bad_request("limit must be an integer")
        if not 1 <= limit <= 500:
            return _bad_request("limit must be 1..500")
        q = params.get("q", "")
        sort_by = params.get("sort_by", "created_at:desc")
        if sort_by not in ("created_at:asc", "created_at:desc"):
            return _bad_request(f"cannot sort by {sort_by!r}")
        try:
            matches = parse_q(q)
            start = _decode_pq(params["pq"], q, sort_by) if params.get("pq") else 0
        except (ValueError, TypeError) as exc:
            return _bad_request(str(exc))
        if self.list_delay_seconds:
            await asyncio.sleep(self.list_delay_seconds)
        with self.lock:
            listed = [r for r in self.runs.values() if matches(r)]
        ordered = sorted(
            listed,
            key=lambda r: (datetime.fromisoformat(r["created_at"]), r["id"]),
            reverse=sort_by.endswith(":desc"),
        )
        items = ordered[start : start + limit]
        more = start + limit < len(ordered)
        self.pages_served += 1
        body = {
            "items": items,
            "next_pq": _encode_pq(start + limit, q, sort_by) if more else None,
            "prev_pq": _encode_pq(max(0, start - limit), q, sort_by) if start else None,
        }
        return Response(orjson.dumps(body), 200, media_type="application/json")

    async def elsewhere(self, request: Request) -> Response:
        self._record(request)
        return Response(b'{"error":"not found"}', 404, media_type="application/json")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/runs", self.list_runs, methods=["GET"]),
                Route("/v1/runs/{rest:path}", self.get_run, methods=["GET"]),
                Route("/{rest:path}", self.elsewhere),
            ]
        )


@contextmanager
def serve_fake(fake: FakeRunflow) -> Iterator[str]:
    """Run the fake on a free 127.0.0.1 port in a thread; yields its base URL."""
    with serve_in_thread(fake.app()) as port:
        yield f"http://127.0.0.1:{port}"
