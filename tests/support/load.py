"""A paced load of signed deliveries against a running receiver, for fault tests and benches.

Each request is scheduled at a fixed rate (``rate`` per second from the start) and its
latency is counted from that scheduled moment, as the sender experiences it: a receiver that
stalls makes the requests scheduled behind the stall late, not merely the one in hand. Every
body is a distinct envelope for a run of its own, so an acknowledgement names exactly one
delivery id and one run id that must be found in the database afterwards.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import httpx
import orjson

from receiver.db import plain_url
from tests.support.builders import envelope, failed_envelope, signed_headers


@dataclass
class Sent:
    """One request: when it was due, when its answer came, what the answer was."""

    index: int
    run_id: str
    due: float  # monotonic
    answered: float | None = None
    status: int | None = None
    error: str | None = None  # exception class name when there was no HTTP answer
    delivery_id: int | None = None

    @property
    def latency(self) -> float | None:
        return None if self.answered is None else self.answered - self.due


@dataclass
class LoadReport:
    sent: list[Sent] = field(default_factory=list)
    started: float = 0.0
    stopped: float = 0.0

    @property
    def acknowledged(self) -> list[Sent]:
        return [s for s in self.sent if s.status is not None and 200 <= s.status < 300]

    @property
    def statuses(self) -> Counter[int]:
        return Counter(s.status for s in self.sent if s.status is not None)

    @property
    def errors(self) -> Counter[str]:
        return Counter(s.error for s in self.sent if s.error is not None)

    def count(self, status: int) -> int:
        return sum(1 for s in self.sent if s.status == status)

    def other_errors(self) -> int:
        """Answers that are neither 2xx nor 503, plus requests that got no answer."""
        return sum(
            1
            for s in self.sent
            if s.error is not None
            or (s.status is not None and not 200 <= s.status < 300 and s.status != 503)
        )

    def latencies(self) -> list[float]:
        return sorted(s.latency for s in self.sent if s.latency is not None)

    def percentile(self, p: float) -> float:
        found = self.latencies()
        if not found:
            return float("nan")
        rank = max(1, math.ceil(p / 100 * len(found)))  # nearest rank; p in percent
        return found[min(rank, len(found)) - 1]

    def first_ack_due_after(self, moment: float) -> Sent | None:
        """The earliest-due acknowledged request that was due after ``moment``."""
        later = [s for s in self.acknowledged if s.due > moment]
        return min(later, key=lambda s: s.due) if later else None

    def resumed_seconds(self, moment: float) -> float | None:
        """Seconds from ``moment`` until the first 2xx answer to a request sent after it."""
        later = [s for s in self.acknowledged if s.due > moment and s.answered is not None]
        if not later:
            return None
        return min(s.answered for s in later if s.answered is not None) - moment

    def summary(self) -> str:
        return (
            f"sent {len(self.sent)} acknowledged {len(self.acknowledged)}"
            f" 503 {self.count(503)} statuses {dict(self.statuses)} errors {dict(self.errors)}"
            f" p50 {self.percentile(50):.3f}s p99 {self.percentile(99):.3f}s"
            f" max {max(self.latencies(), default=float('nan')):.3f}s"
        )


def delivery_body(prefix: str, index: int) -> tuple[str, bytes]:
    """A distinct, valid envelope for run ``{prefix}-{index}`` (one in five failed)."""
    run_id = f"{prefix}-{index:06d}"
    doc = failed_envelope(run_id) if index % 5 == 0 else envelope(run_id)
    return run_id, orjson.dumps(doc)


async def run_load(
    base_url: str,
    *,
    rate: float,
    seconds: float,
    prefix: str,
    request_timeout: float = 30.0,
    keepalive: bool = True,
    max_in_flight: int = 400,
    stop: asyncio.Event | None = None,
) -> LoadReport:
    """Send ``rate`` deliveries a second for ``seconds`` (or until ``stop``); wait for answers.

    ``request_timeout`` bounds each request (an unanswered one is recorded as ``ReadTimeout`` etc.);
    the whole call ends by ``seconds + request_timeout`` plus a little.
    """
    report = LoadReport()
    # Idle connections are dropped well before uvicorn's 5 s keep-alive timeout, so a request
    # never races the server closing the connection it was about to reuse.
    limits = httpx.Limits(
        max_connections=max_in_flight,
        max_keepalive_connections=max_in_flight if keepalive else 0,
        keepalive_expiry=2.0,
    )
    gate = asyncio.Semaphore(max_in_flight)
    url = f"{base_url}/webhooks/runflow"

    async def one(client: httpx.AsyncClient, item: Sent, body: bytes) -> None:
        try:
            response = await client.post(url, content=body, headers=signed_headers(body))
        except httpx.HTTPError as exc:
            item.error = type(exc).__name__
        else:
            item.status = response.status_code
            if response.is_success:
                item.delivery_id = int(response.json()["delivery_id"])
        finally:
            item.answered = time.monotonic()
            gate.release()

    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []
        report.started = time.monotonic()
        total = int(rate * seconds)
        for index in range(total):
            due = report.started + index / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop is not None and stop.is_set():
                break
            run_id, body = delivery_body(prefix, index)
            item = Sent(index, run_id, due)
            report.sent.append(item)
            await gate.acquire()
            tasks.append(asyncio.create_task(one(client, item, body)))
        report.stopped = time.monotonic()
        if tasks:
            await asyncio.wait(tasks, timeout=request_timeout + 10)
    return report


async def missing_acknowledged(database_url: str, report: LoadReport) -> list[Sent]:
    """Acknowledged requests whose delivery row or run row is not in the database."""
    conn = await asyncpg.connect(plain_url(database_url), timeout=30)
    try:
        acked = report.acknowledged
        deliveries = {
            row["id"]
            for row in await conn.fetch(
                "SELECT id FROM deliveries WHERE id = ANY($1::bigint[])",
                [s.delivery_id for s in acked],
            )
        }
        runs = {
            row["id"]
            for row in await conn.fetch(
                "SELECT id FROM runs WHERE id = ANY($1::text[])", [s.run_id for s in acked]
            )
        }
    finally:
        await conn.close()
    return [s for s in acked if s.delivery_id not in deliveries or s.run_id not in runs]


async def seed_runs(database_url: str, count: int, *, prefix: str = "an") -> None:
    """``count`` terminal runs spread over the last 7 days, for analytics to chew on."""
    conn = await asyncpg.connect(plain_url(database_url), timeout=30)
    try:
        await conn.execute(
            "INSERT INTO runs (id, status, model, failure_code, failure_stage, duration_ms,"
            " cost, target_type, created_at, completed_at)"
            " SELECT $1 || '-' || g,"
            "  CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 'model-' || (g % 8),"
            "  CASE WHEN g % 10 = 0 THEN 'code-' || (g % 7) END,"
            "  CASE WHEN g % 10 = 0 THEN 'execution' END, (g * 7919) % 60000,"
            "  (g % 1000) / 10000.0, 'model',"
            "  now() - (g % 604000) * interval '1 second',"
            "  now() - (g % 604000) * interval '1 second' + interval '30 seconds'"
            " FROM generate_series(1, $2::int) AS g",
            prefix,
            count,
        )
        await conn.execute("ANALYZE runs")
    finally:
        await conn.close()


ANALYTICS_PATHS = (
    "/analytics/durations?group_by=model",
    "/analytics/costs?group_by=model",
    "/analytics/failures",
    "/analytics/timeseries?bucket=hour",
)


async def analytics_pressure(
    base_url: str, token: str, *, clients: int, stop: asyncio.Event, window_days: int = 7
) -> Counter[int | str]:
    """``clients`` dashboards, each asking for a long analytics window again and again.

    Returns the answers' statuses (and exception names) until ``stop`` is set.
    """
    from datetime import UTC, datetime, timedelta

    after = (datetime.now(UTC) - timedelta(days=window_days)).isoformat()
    seen: Counter[int | str] = Counter()

    async def dashboard(client: httpx.AsyncClient, offset: int) -> None:
        turn = offset
        while not stop.is_set():
            path = ANALYTICS_PATHS[turn % len(ANALYTICS_PATHS)]
            turn += 1
            try:
                answer = await client.get(
                    f"{base_url}{path}",
                    params={"created_after": after},
                    headers={"authorization": f"Bearer {token}"},
                )
            except httpx.HTTPError as exc:
                seen[type(exc).__name__] += 1
                continue
            seen[answer.status_code] += 1
            if answer.status_code == 503:
                # What a dashboard does with Retry-After, shortened so the pressure stays on.
                await asyncio.sleep(0.2)

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(dashboard(client, i) for i in range(clients)))
    return seen


async def ingest_beside_analytics(
    base_url: str,
    token: str,
    *,
    rate: float,
    seconds: float,
    prefix: str,
    analytics_clients: int,
) -> tuple[LoadReport, Counter[int | str]]:
    """A paced ingest load, with ``analytics_clients`` dashboards hammering analytics (0: none)."""
    stop = asyncio.Event()
    pressure = (
        asyncio.create_task(
            analytics_pressure(base_url, token, clients=analytics_clients, stop=stop)
        )
        if analytics_clients
        else None
    )
    if pressure is not None:
        await asyncio.sleep(1)  # let the dashboards get going first
    try:
        report = await run_load(
            base_url, rate=rate, seconds=seconds, prefix=prefix, request_timeout=30
        )
    finally:
        stop.set()
    seen = await pressure if pressure is not None else Counter()
    return report, seen
