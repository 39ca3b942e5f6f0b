"""API response shapes as pydantic models: the OpenAPI document is generated from these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    # Groups carry one key per group_by dimension besides the documented fields.
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Out):
    code: str
    message: str
    details: list[Any]
    delivery_id: int | None = None


class ErrorBody(_Out):
    error: ErrorDetail


class IngestAnswer(_Out):
    status: str
    delivery_id: int
    run_id: str | None = None
    batch_id: str | None = None
    duplicate_of: int | None = None


class ReplayAnswer(IngestAnswer):
    cause: str | None = None
    cause_detail: dict[str, Any] | None = None


class Health(_Open):
    status: str


class NodeRunOut(_Out):
    id: str
    node_id: str | None
    node_type: str | None
    status: str | None
    failure_code: str | None
    failure_message: str | None
    created_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    duration_ms: int | None


class RunOut(_Out):
    id: str
    org_id: str | None
    status: str | None
    event: str | None
    target_type: str | None
    model: str | None
    model_id: str | None
    flow_id: str | None
    comfyui_workflow_id: str | None
    batch_id: str | None
    client_ref: str | None
    source: str | None
    failure_code: str | None
    failure_message: str | None
    failure_stage: str | None
    duration_ms: int | None
    cost: str | None
    created_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    input: Any
    output: Any
    metadata: Any
    first_received_at: datetime
    last_received_at: datetime
    delivery_count: int
    enriched_at: datetime | None
    enrichment_error: str | None


class RunDetail(RunOut):
    node_runs: list[NodeRunOut]


class RunPage(_Out):
    items: list[RunOut]
    next_cursor: str | None


class DeliveryOut(_Out):
    id: int
    received_at: datetime
    outcome: str
    cause: str | None
    cause_detail: Any
    kind: str | None
    run_id: str | None
    batch_id: str | None
    signature: str
    source: str
    request_id: str | None
    content_type: str | None
    body_size: int | None
    duplicate_of: int | None
    replay_count: int
    replayed_at: datetime | None
    headers: Any


class DeliveryDetail(DeliveryOut):
    body: str | None


class DeliveryList(_Out):
    items: list[DeliveryOut]
    next_cursor: str | None
    aged_out: bool = Field(
        default=False,
        description="true when the run was first heard of before retained_since: its older"
        " deliveries have been pruned from the archive (the run row itself is whole)",
    )
    retained_since: datetime | None = Field(
        default=None, description="the oldest received_at the archive still keeps"
    )


class DeliveryPage(_Out):
    items: list[DeliveryOut]
    next_cursor: str | None


class FailureGroup(_Open):
    count: int
    share: float


class Failures(_Out):
    total_runs: int
    failed_runs: int
    groups: list[FailureGroup]


class Point(_Out):
    ts: datetime
    total: int
    succeeded: int
    failed: int
    cancelled: int
    partial_succeeded: int
    failure_rate: float | None


class Series(_Out):
    key: dict[str, str | None]
    points: list[Point]


class Timeseries(_Out):
    bucket: str
    series: list[Series]


class DurationGroup(_Open):
    count: int
    p50_ms: int
    p90_ms: int
    p95_ms: int
    p99_ms: int
    max_ms: int


class Durations(_Out):
    groups: list[DurationGroup]


class CostGroup(_Open):
    runs: int
    cost: str


class Costs(_Out):
    total: str
    groups: list[CostGroup]


class EnrichmentStatus(_Out):
    enabled: bool
    pending: int
    done: int
    failed: int
    oldest_pending_seconds: float | None


class ReconciliationStatus(_Out):
    enabled: bool
    interval_seconds: float
    lookback_seconds: float
    stale_seconds: float
    running: bool
    watermark: datetime | None
    last_started_at: datetime | None
    last_finished_at: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    runs_imported: int
    runs_refetched: int
    passes: int


class AlertState(_Out):
    group: dict[str, str | None]
    state: str
    value: float | None
    updated_at: datetime


class AlertRuleOut(_Out):
    rule: dict[str, Any]
    states: list[AlertState]


class AlertRules(_Out):
    items: list[AlertRuleOut]


class AlertDelivery(_Out):
    """Where the outbox stands with one hook target's notification of an event."""

    url: str
    state: str  # pending (retrying), sent, failed (gave up)
    attempts: int
    last_error: str | None
    sent_at: datetime | None


class AlertEvent(_Out):
    id: int
    rule: str
    group: dict[str, str | None]
    from_state: str
    to_state: str
    value: float | None
    threshold: float
    notified: bool
    at: datetime
    notifications: list[AlertDelivery]


class AlertEventPage(_Out):
    items: list[AlertEvent]
    next_cursor: str | None
