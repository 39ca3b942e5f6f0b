"""Prometheus metrics for ``GET /metrics``.

Two sources, each chosen for being exact with several uvicorn workers:

- Counted where they happen (deliveries by outcome and cause, ingest latency, runs reaching a
  terminal status): prometheus_client in multiprocess mode. ``serve`` points
  PROMETHEUS_MULTIPROC_DIR at an empty directory before the workers start; each worker writes
  its own files and a scrape, whichever worker answers it, sums them all. A latency histogram
  cannot be rebuilt from the database, and counting in the database would put a hot counter
  row on every ingest transaction.
- Read from PostgreSQL at scrape time (failures of the last 24 hours by code and stage,
  enrichment queue depth, states of enabled alert rules): the database already holds them
  exactly, and the indexes make each read a few milliseconds. Reconciliation's totals and last
  success are read from its state row the same way. When the database cannot be
  reached the scrape still answers, with the counters and ``runflow_receiver_database_up 0``:
  an outage is when the ``unavailable`` delivery count matters most.

Without PROMETHEUS_MULTIPROC_DIR (tests, the in-process app) the counters are per process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.ext.asyncio import AsyncEngine

from receiver import analytics
from receiver.alerts.store import enabled_rule_states
from receiver.db import DATABASE_DOWN
from receiver.enrichment import queue_status
from receiver.reconciliation import metric_families as reconcile_families
from receiver.retention import archive_status
from receiver.settings import Settings

DELIVERIES = Counter(
    "runflow_receiver_deliveries",
    "Webhook requests by outcome (stored, duplicate, rejected, unavailable, error) and cause",
    ["outcome", "cause"],
)
REFUSED = Counter(
    "runflow_receiver_refused",
    "Webhook requests refused before anything was stored (invalid_signature,"
    " payload_too_large, headers_too_large, request_timeout): counted, logged at a bounded"
    " rate, never kept",
    ["cause"],
)
# Series exist from start-up at zero: a restart with no traffic since is visible as zero, not
# as an absent series that rate() == 0 alerts never see.
for _outcome in ("stored", "duplicate"):
    DELIVERIES.labels(_outcome, "")
for _cause in ("invalid_signature", "payload_too_large", "headers_too_large", "request_timeout"):
    REFUSED.labels(_cause)
INGEST_SECONDS = Histogram(
    "runflow_receiver_ingest_seconds",
    "Time to handle a webhook request, body read to answer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RUNS_TERMINAL = Counter(
    "runflow_receiver_runs_terminal",
    "Runs that reached a terminal status (or changed between terminal statuses)",
    ["status"],
)
ANALYTICS_REFUSED = Counter(
    "runflow_receiver_analytics_refused",
    "Analytics requests answered 503 because the process's analytics slots stayed busy",
)
# Counted by serve's main process (the embedded server's supervisor), summed like the rest.
EMBEDDED_RESTARTS = Counter(
    "runflow_receiver_embedded_database_restarts",
    "Times serve found its embedded PostgreSQL dead and started it again",
)
EMBEDDED_OUTAGES = Counter(
    "runflow_receiver_embedded_database_outages",
    "Times serve found its embedded PostgreSQL dead",
)
RUNS_TERMINAL.labels("failed")  # so the first failure after a restart counts in increase()
CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger(__name__)


def record_terminal(transitions: Iterable[str]) -> None:
    for status in transitions:
        RUNS_TERMINAL.labels(status).inc()


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


async def database_families(settings: Settings, engine: AsyncEngine) -> list[Metric]:
    failures = GaugeMetricFamily(
        "runflow_receiver_failures_24h",
        "Failed runs created in the last 24 hours, by failure code (top N, the rest as other)"
        " and stage",
        labels=["failure_code", "failure_stage"],
    )
    rows = await analytics.failures_last_day(engine)
    states = await enabled_rule_states(engine)
    per_code: dict[str, int] = {}
    for row in rows:
        code = row["failure_code"] or "unknown"
        per_code[code] = per_code.get(code, 0) + row["n"]
    top = set(
        sorted(per_code, key=lambda c: (-per_code[c], c))[: settings.metrics_top_failure_codes]
    )
    folded: dict[tuple[str, str], int] = {}
    for row in rows:
        code = row["failure_code"] or "unknown"
        key = (code if code in top else "other", row["failure_stage"] or "unknown")
        folded[key] = folded.get(key, 0) + row["n"]
    for (code, stage), count in sorted(folded.items()):
        failures.add_metric([code, stage], count)

    queue = await queue_status(engine)
    depth = GaugeMetricFamily(
        "runflow_receiver_enrichment_queue_depth", "Runs waiting for enrichment"
    )
    depth.add_metric([], queue["pending"])
    oldest = GaugeMetricFamily(
        "runflow_receiver_enrichment_oldest_seconds", "Age of the oldest run waiting for enrichment"
    )
    oldest.add_metric([], queue["oldest_pending_seconds"] or 0.0)
    failed = GaugeMetricFamily(
        "runflow_receiver_enrichment_failed", "Runs whose enrichment ended without a Run object"
    )
    failed.add_metric([], queue["failed"])

    alert = GaugeMetricFamily(
        "runflow_receiver_alert_state",
        "1 for the current state of each alert rule and group",
        labels=["rule", "group", "state"],
    )
    for row in states:
        group: dict[str, Any] = orjson.loads(row["group_key"])
        label = ",".join(f"{k}={v}" for k, v in sorted(group.items()))
        alert.add_metric([row["name"], label, row["state"]], 1)
    return [
        failures,
        depth,
        oldest,
        failed,
        alert,
        *await reconcile_families(settings, engine),
        *await archive_families(engine),
    ]


async def archive_families(engine: AsyncEngine) -> list[Metric]:
    """The archive's partitions: the default one should stay empty, days should lie ahead."""
    status = await archive_status(engine)
    stranded = GaugeMetricFamily(
        "runflow_receiver_archive_default_partition_rows",
        "Deliveries in the archive's default partition (no daily partition covered them;"
        " counted up to 1,000,000): above 0, partition maintenance is not running",
    )
    stranded.add_metric([], status["default_partition_rows"])
    partitions = GaugeMetricFamily(
        "runflow_receiver_archive_partitions", "Daily partitions the archive has"
    )
    partitions.add_metric([], status["partitions"])
    ahead = GaugeMetricFamily(
        "runflow_receiver_archive_covered_seconds",
        "Seconds from now to the end of the newest daily archive partition",
    )
    until = status["covered_until"]
    ahead.add_metric([], (until - datetime.now(UTC)).total_seconds() if until else 0.0)
    oldest = GaugeMetricFamily(
        "runflow_receiver_archive_retained_since_timestamp_seconds",
        "Start of the oldest daily archive partition (older deliveries were pruned)",
    )
    since = status["retained_since"]
    oldest.add_metric([], since.timestamp() if since else 0.0)
    return [stranded, partitions, ahead, oldest]


async def render(settings: Settings, engine: AsyncEngine) -> bytes:
    """The /metrics body: process or multiprocess counters, then the database's figures."""
    up = GaugeMetricFamily(
        "runflow_receiver_database_up", "1 when this scrape could read the database"
    )
    families: list[Metric] = []
    try:
        families = await database_families(settings, engine)
        up.add_metric([], 1)
    except DATABASE_DOWN as exc:
        log.warning("metrics: database unavailable: %s: %s", type(exc).__name__, exc)
        up.add_metric([], 0)
    registry = CollectorRegistry()
    registry.register(_Families([*families, up]))
    if os.environ.get(MULTIPROC_ENV):
        if values.ValueClass is values.MutexValue:
            # Imported before serve set the directory: counts stay in this process's memory
            # while the scrape reads the (empty) files, so every counter would read zero.
            raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set")
        counted = CollectorRegistry()
        MultiProcessCollector(counted)  # type: ignore[no-untyped-call]
        return generate_latest(counted) + generate_latest(registry)
    return generate_latest(REGISTRY) + generate_latest(registry)
