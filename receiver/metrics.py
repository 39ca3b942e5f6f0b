"""``GET /metrics``: Prometheus metrics, correct however many uvicorn workers serve.

Two sources, chosen per metric by what makes it exact:

- Counted in the process, as deliveries are answered: ``runflow_receiver_deliveries_total``
  (``outcome`` stored, duplicate or rejected, ``cause`` the error code of a rejection, else
  ""; answers the receiver could not give, 5xx, count as outcome ``error``) and the
  ``runflow_receiver_ingest_seconds`` histogram of webhook handling time. Only the process
  that answered knows these, and each worker answers a share of the deliveries, so under
  ``serve`` they use prometheus_client's multiprocess mode: ``serve`` points
  ``PROMETHEUS_MULTIPROC_DIR`` at an emptied ``<data_dir>/metrics`` before uvicorn starts its
  workers, every worker writes its values to files there, and a scrape, whichever worker
  answers it, sums the files of all of them (``MultiProcessCollector``). Without that
  variable (an app built in-process, as in tests) the values live in a registry of the app's
  own, so two apps never share counts.
- Read from PostgreSQL at scrape time: ``runflow_receiver_failures_24h`` (failed runs whose
  ``sort_at`` is in the last 24 hours, by ``failure_code`` and ``failure_stage``; codes past
  the top ``RECEIVER_METRICS_TOP_FAILURE_CODES`` by count fold into ``failure_code="other"``
  so cardinality stays bounded), ``runflow_receiver_runs_24h`` (runs by terminal status over
  the same window) and the enrichment queue's depth and oldest pending age. The database is
  the one place that knows these for all workers and replicas at once, so they are exact by
  construction; the runs reads are 24-hour ranges of existing indexes (``ix_runs_status_sort``
  includes the failure columns, ``ix_runs_sort`` the status). Should the database not
  answer, the scrape still returns the in-process metrics, with
  ``runflow_receiver_database_up`` 0.
"""

from __future__ import annotations

import logging
import os
from collections import Counter as Tally
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver.db import driver_connection
from receiver.payloads import TERMINAL_STATUSES
from receiver.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_FAILURES = (
    "SELECT failure_code, failure_stage, count(*) AS n FROM runs"
    " WHERE status = 'failed' AND sort_at >= now() - interval '24 hours'"
    " GROUP BY failure_code, failure_stage"
)
_TERMINAL = (
    "SELECT status, count(*) AS n FROM runs"
    " WHERE sort_at >= now() - interval '24 hours' AND status = ANY($1::text[])"
    " GROUP BY status"
)


def fold_failures(
    rows: Iterable[tuple[str | None, str | None, int]], top: int
) -> dict[tuple[str, str], int]:
    """Counts by (failure_code, failure_stage); codes past the ``top`` most frequent → other.

    Codes are ranked by their count over all stages (ties by name, so the cut is stable);
    a missing code or stage is "".
    """
    named = [(code or "", stage or "", n) for code, stage, n in rows]
    by_code: Tally[str] = Tally()
    for code, _, n in named:
        by_code[code] += n
    ranked = sorted(by_code, key=lambda code: (-by_code[code], code))
    kept = set(ranked[:top])
    out: Tally[tuple[str, str]] = Tally()
    for code, stage, n in named:
        out[(code if code in kept else OTHER, stage)] += n
    return dict(out)


class _Fixed:
    """A collector that returns families already built (from the database) once."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class Metrics:
    """One app's in-process metrics, and the scrape that adds the database-derived ones."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.multiproc_dir = os.environ.get(MULTIPROC_ENV) or None
        if self.multiproc_dir and values.ValueClass is values.MutexValue:
            raise RuntimeError(
                f"prometheus_client was imported before {MULTIPROC_ENV} was set: its metrics"
                " would stay in this process and /metrics would miss the other workers'"
            )
        # In multiprocess mode this registry is never scraped (values go to files); it only
        # keeps these metrics out of the library's global registry.
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "runflow_receiver_deliveries",
            "Webhook deliveries answered, by outcome and rejection cause (an error code)",
            ["outcome", "cause"],
            registry=self.registry,
        )
        self.ingest_seconds = Histogram(
            "runflow_receiver_ingest_seconds",
            "Time to handle one webhook delivery, from request to answer",
            buckets=_BUCKETS,
            registry=self.registry,
        )

    def delivery(self, outcome: str, cause: str, seconds: float) -> None:
        self.deliveries.labels(outcome, cause).inc()
        self.ingest_seconds.observe(seconds)

    async def database_families(self, engine: AsyncEngine) -> list[Metric]:
        failures = GaugeMetricFamily(
            "runflow_receiver_failures_24h",
            "Failed runs created in the last 24 hours, by failure code (top N, the rest as"
            " other) and stage",
            labels=["failure_code", "failure_stage"],
        )
        runs = GaugeMetricFamily(
            "runflow_receiver_runs_24h",
            "Runs created in the last 24 hours that reached a terminal status, by status",
            labels=["status"],
        )
        depth = GaugeMetricFamily(
            "runflow_receiver_enrichment_queue_depth", "Runs waiting for enrichment"
        )
        oldest = GaugeMetricFamily(
            "runflow_receiver_enrichment_queue_oldest_seconds",
            "Age of the oldest run waiting for enrichment (0 when none)",
        )
        from receiver.enrichment import queue_status

        async with driver_connection(engine) as conn:
            failed = await conn.fetch(_FAILURES)
            terminal = await conn.fetch(_TERMINAL, list(TERMINAL_STATUSES))
        queue = await queue_status(engine)
        rows = [(r["failure_code"], r["failure_stage"], r["n"]) for r in failed]
        folded = fold_failures(rows, self.settings.metrics_top_failure_codes)
        for (code, stage), n in sorted(folded.items()):
            failures.add_metric([code, stage], n)
        counts = {r["status"]: r["n"] for r in terminal}
        for status in TERMINAL_STATUSES:
            runs.add_metric([status], counts.get(status, 0))
        depth.add_metric([], queue["pending"])
        oldest.add_metric([], queue["oldest_pending_seconds"] or 0.0)
        return [failures, runs, depth, oldest]

    async def render(self, engine: AsyncEngine, accept: str) -> tuple[bytes, str]:
        """The exposition for one scrape, and its content type (negotiated from ``accept``)."""
        from receiver.app import DATABASE_DOWN

        up = GaugeMetricFamily(
            "runflow_receiver_database_up", "1 when this scrape could read the database"
        )
        families: list[Metric] = []
        try:
            families = await self.database_families(engine)
            up.add_metric([], 1)
        except DATABASE_DOWN as exc:
            log.warning("metrics: database unavailable: %s: %s", type(exc).__name__, exc)
            up.add_metric([], 0)
        scrape = CollectorRegistry()
        if self.multiproc_dir:
            MultiProcessCollector(scrape, path=self.multiproc_dir)  # type: ignore[no-untyped-call]
        else:
            scrape.register(self.registry)
        scrape.register(_Fixed([*families, up]))
        encoder, content_type = choose_encoder(accept)
        return encoder(scrape), content_type
