"""A local fake of Runflow's API for enrichment and backfill tests, served on 127.0.0.1.

Serves Run objects (the shape of tests.builders.run_object) at GET /v1/runs/{id} and pages of
them at GET /v1/runs; failures are injected per test: a number of 429s or 500s first, a delay,
404 for unknown runs. Every request is counted.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.processes import serve_in_thread


@dataclass
class FakeRunflow:
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    api_key: str = "rf_test_key"
    fail_first: int = 0  # answer this many requests with fail_status first
    fail_status: int = 429
    retry_after: str | None = "0.05"
    delay_seconds: float = 0.0
    fail_pages_after: int | None = None  # /v1/runs pages served before answering 500 forever
    requests: Counter[str] = field(default_factory=Counter)
    pages_served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _failing(self) -> bool:
        with self.lock:
            total = sum(self.requests.values())
        return total <= self.fail_first

    async def get_run(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        self.requests[run_id] += 1
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return Response(b'{"error":"unauthorized"}', 401, media_type="application/json")
        if self._failing():
            headers = {"retry-after": self.retry_after} if self.retry_after else {}
            return Response(b"{}", self.fail_status, headers=headers, media_type="application/json")
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        run = self.runs.get(run_id)
        if run is None:
            return Response(b'{"error":"not found"}', 404, media_type="application/json")
        return Response(orjson.dumps(run), 200, media_type="application/json")

    async def list_runs(self, request: Request) -> Response:
        self.requests["/v1/runs"] += 1
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return Response(b"{}", 401, media_type="application/json")
        if self.fail_pages_after is not None and self.pages_served >= self.fail_pages_after:
            return Response(b"{}", 500, media_type="application/json")
        after = request.query_params.get("created_after", "")
        before = request.query_params.get("created_before")
        limit = int(request.query_params.get("limit", "100"))
        start = int(request.query_params.get("cursor") or 0)
        ordered = sorted(
            (
                r
                for r in self.runs.values()
                if r["created_at"] >= after and (before is None or r["created_at"] < before)
            ),
            key=lambda r: (r["created_at"], r["id"]),
        )
        items = ordered[start : start + limit]
        more = start + limit < len(ordered)
        self.pages_served += 1
        body = {"items": items, "next_cursor": str(start + limit) if more else None}
        return Response(orjson.dumps(body), 200, media_type="application/json")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/runs", self.list_runs, methods=["GET"]),
                Route("/v1/runs/{run_id}", self.get_run, methods=["GET"]),
            ]
        )


@contextmanager
def serve_fake(fake: FakeRunflow) -> Iterator[str]:
    """Run the fake on a free 127.0.0.1 port in a thread; yields its base URL."""
    with serve_in_thread(fake.app()) as port:
        yield f"http://127.0.0.1:{port}"
