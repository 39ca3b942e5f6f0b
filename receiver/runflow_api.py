"""The one client for Runflow's API: base URL, key, organisation, rate limit, errors, retries.

Enrichment, backfill and reconciliation all call Runflow through :class:`RunflowClient`:

- ``get_run(run_id)``: ``GET /v1/runs/{run_id}``, the id percent-encoded as ONE path segment
  (a run id comes from a signed but otherwise untrusted payload: ``../../admin/keys?x#`` must
  not become another URL carrying our API key). An id that cannot form a URL (empty, over 255
  characters, control characters, ``.`` or ``..``) raises :class:`InvalidRunId` before any
  request is made.
- ``list_runs(q=, sort_by=, limit=, pq=)``: Runflow's documented list API (``GET /v1/runs``,
  one filter expression in ``q``, cursor ``pq``, answer ``{"items", "next_pq", "prev_pq"}``).

Every call is one attempt; :meth:`RunflowClient.with_retries` repeats a call with the shared
back-off (``receiver.backoff``). What a call can raise::

    RunflowApiError                 not worth repeating (another 4xx, a page of the wrong shape)
    ├── InvalidRunId                the id cannot form a URL: nothing was sent
    ├── RunNotFound                 404
    ├── ApiKeyRefused               401 / 403: pause, don't hammer
    └── TransientApiError           429, 5xx, timeouts, transport errors, invalid JSON in the
                                    answer, unexpected exceptions: retry, counted per attempt

Each error has a ``reason`` string (``http_503``, ``invalid_run_id: ...``) that callers record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import orjson

from receiver.backoff import full_jitter, parse_retry_after
from receiver.settings import Settings

T = TypeVar("T")

MAX_RUN_ID_LENGTH = 255
MAX_PAGE_SIZE = 500


class RunflowApiError(Exception):
    """A call to Runflow's API that did not give an answer; ``reason`` says why."""

    retryable = False

    def __init__(
        self, reason: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class InvalidRunId(RunflowApiError):
    """The run id cannot be put in a URL; no request was made."""


class RunNotFound(RunflowApiError):
    """Runflow has no such run (404)."""


class ApiKeyRefused(RunflowApiError):
    """Runflow refused the API key (401/403)."""


class TransientApiError(RunflowApiError):
    """Worth trying again after a back-off (429, 5xx, timeouts, broken answers)."""

    retryable = True


class RateLimiter:
    """At most ``rate`` acquisitions per second across the tasks that share it.

    The bookkeeping has no await in it, so no lock is needed (and none ties it to one loop).
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_at = time.monotonic()

    async def acquire(self) -> None:
        now = time.monotonic()
        wait = self.next_at - now
        self.next_at = max(now, self.next_at) + self.interval
        if wait > 0:
            await asyncio.sleep(wait)


_PROCESS_LIMITERS: dict[float, RateLimiter] = {}


def process_limiter(rate: float) -> RateLimiter:
    """The limiter every client in this process shares (RECEIVER_ENRICHMENT_RPS is per process)."""
    limiter = _PROCESS_LIMITERS.get(rate)
    if limiter is None:
        limiter = _PROCESS_LIMITERS[rate] = RateLimiter(rate)
    return limiter


def run_path(run_id: str) -> str:
    """``/v1/runs/{id}`` with the id as one percent-encoded segment; raises InvalidRunId."""
    if not isinstance(run_id, str) or not run_id:
        raise InvalidRunId("invalid_run_id: empty")
    if len(run_id) > MAX_RUN_ID_LENGTH:
        raise InvalidRunId(f"invalid_run_id: longer than {MAX_RUN_ID_LENGTH} characters")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in run_id):
        raise InvalidRunId(f"invalid_run_id: control characters in {run_id!r}")
    if run_id in (".", ".."):
        # Percent-encoding leaves dots alone and URL normalisation removes dot segments.
        raise InvalidRunId(f"invalid_run_id: {run_id!r} is a relative path segment")
    return "/v1/runs/" + quote(run_id, safe="")


def created_between(since: datetime, until: datetime | None = None) -> str:
    """The ``q`` expression for runs created in ``[since, until)`` (Runflow's filter syntax)."""
    q = f"created_at>={since.isoformat()}"
    return q if until is None else f"{q} AND created_at<{until.isoformat()}"


@dataclass
class Fetched:
    """One answer: the raw bytes (what the archive keeps), the parsed JSON, and where from."""

    body: bytes
    document: Any
    url: str
    request_id: str | None


@dataclass
class RunPage:
    """One page of ``GET /v1/runs``."""

    items: list[Any]
    next_pq: str | None
    prev_pq: str | None


class RunflowClient:
    """Runflow's API for this process; close with :meth:`aclose` (or ``async with``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        headers = {"accept": "application/json", "user-agent": "runflow-receiver"}
        if settings.runflow_api_key:
            headers["authorization"] = f"Bearer {settings.runflow_api_key}"
        if settings.runflow_org_id:
            headers["x-organization-id"] = settings.runflow_org_id
        self.http = httpx.AsyncClient(
            base_url=settings.runflow_api_url.rstrip("/"),
            headers=headers,
            timeout=settings.enrichment_timeout_seconds,
            transport=transport,
        )
        self.limiter = limiter or process_limiter(settings.enrichment_rps)

    async def __aenter__(self) -> RunflowClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> Fetched:
        await self.limiter.acquire()
        try:
            # httpx's timeout bounds each phase; a server trickling its answer needs a deadline.
            async with asyncio.timeout(self.settings.enrichment_timeout_seconds * 3):
                response = await self.http.get(path, params=params)
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise TransientApiError(f"timeout: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise TransientApiError(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # counted like any other failed attempt, never a tight loop
            raise TransientApiError(f"unexpected: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status == 404:
            raise RunNotFound("not_found: Runflow has no such run", status=status)
        if status in (401, 403):
            raise ApiKeyRefused(f"http_{status}: API key refused", status=status)
        if status == 429 or status >= 500:
            wait = parse_retry_after(response.headers.get("retry-after"))
            raise TransientApiError(f"http_{status}", status=status, retry_after=wait)
        if status != 200:
            detail = response.text[:200]
            raise RunflowApiError(f"http_{status}: {detail}", status=status)
        try:
            document = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise TransientApiError(f"invalid_json: {exc}", status=status) from exc
        return Fetched(
            body=response.content,
            document=document,
            url=str(response.request.url),
            request_id=response.headers.get("x-request-id"),
        )

    async def get_run(self, run_id: str) -> Fetched:
        """One attempt at ``GET /v1/runs/{run_id}``."""
        return await self._get(run_path(run_id))

    async def list_runs(
        self,
        *,
        q: str | None = None,
        sort_by: str | None = "created_at:asc",
        limit: int = MAX_PAGE_SIZE,
        pq: str | None = None,
    ) -> RunPage:
        """One attempt at one page of ``GET /v1/runs`` (Runflow's documented list API)."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be 1..{MAX_PAGE_SIZE}")
        params: dict[str, Any] = {"limit": limit}
        if q:
            params["q"] = q
        if sort_by:
            params["sort_by"] = sort_by
        if pq:
            params["pq"] = pq
        fetched = await self._get("/v1/runs", params)
        page = fetched.document
        # A page without these keys is not the documented API: stopping quietly after page one
        # would report success for an import that never happened.
        if not isinstance(page, dict) or not isinstance(page.get("items"), list):
            raise RunflowApiError("unexpected_page: the answer has no items list")
        if "next_pq" not in page:
            raise RunflowApiError("unexpected_page: the answer has no next_pq")
        return RunPage(
            items=page["items"],
            next_pq=page.get("next_pq") or None,
            prev_pq=page.get("prev_pq") or None,
        )

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """The shared back-off with this client's settings."""
        return full_jitter(
            attempt,
            base=self.settings.enrichment_backoff_seconds,
            cap=self.settings.enrichment_backoff_max_seconds,
            retry_after=retry_after,
        )

    async def with_retries(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        stop: asyncio.Event | None = None,
        before_attempt: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """``call()`` until it answers, up to ``enrichment_max_attempts`` tries.

        TransientApiError is retried after the back-off (a set ``stop`` cuts the wait short and
        ends the loop); any other RunflowApiError, and the last TransientApiError, propagate.
        ``before_attempt`` runs before each try (the reconciler renews its lease there).
        """
        attempts = self.settings.enrichment_max_attempts
        for attempt in range(1, attempts + 1):
            if before_attempt is not None:
                await before_attempt()
            try:
                return await call()
            except TransientApiError as error:
                if attempt == attempts or (stop is not None and stop.is_set()):
                    raise
                delay = self.backoff(attempt, error.retry_after)
                if stop is None:
                    await asyncio.sleep(delay)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                if stop.is_set():
                    raise
        raise AssertionError("unreachable")  # pragma: no cover
