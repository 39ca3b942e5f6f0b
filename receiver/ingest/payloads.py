"""Wire formats Runflow sends, validated, and their normalisation into plain run patches.

Three shapes reach ``POST /webhooks/runflow``: the per-run callback envelope (``run_id``),
the batch envelope (``batch_id``) and whole Run objects (``id``, or only ``client_ref``).
``parse_payload`` picks the shape and returns a :class:`ParsedPayload` of plain data; the
merge and the store never see pydantic models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from receiver.errors import InvalidPayload
from receiver.vocabulary import EVENT_STATUS, STATUSES, normalise_status


def _status_word(value: object) -> object:
    """One spelling per status (``cancelled``); unknown words fail validation."""
    if value is None or not isinstance(value, str):
        return value
    return normalise_status(value)


def _id_text(value: object) -> object:
    # Ids are strings on the wire; an integer id from an old relay is the same id.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _decimal_text(value: object) -> object:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("cost must be a decimal string")
    if isinstance(value, int | float | str):
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            raise ValueError(f"cost {value!r} is not a decimal number") from None
        if not number.is_finite():
            raise ValueError("cost must be finite")
        return number
    raise ValueError("cost must be a decimal string")


Status = Annotated[Literal[STATUSES], BeforeValidator(_status_word)]  # type: ignore[valid-type]
Id = Annotated[str, BeforeValidator(_id_text), Field(min_length=1, max_length=255)]
Text = Annotated[str, BeforeValidator(_id_text)]
Cost = Annotated[Decimal, BeforeValidator(_decimal_text)]
Duration = Annotated[int, Field(ge=0, le=10**12)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ModelRef(_Wire):
    id: Id | None = None
    slug: Text | None = None


class NodeRunIn(_Wire):
    id: Id
    node_id: Text | None = None
    node_type: Text | None = None
    status_code: Status | None = Field(default=None, validation_alias="status_code")
    status: Status | None = None
    failure_code: Text | None = None
    failure_message: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_ms: Duration | None = None


class LogIn(_Wire):
    id: Id
    level: Text | None = None
    message: str | None = None
    node_run_id: Id | None = None
    created_at: datetime | None = None
    timestamp: datetime | None = None


class RunObject(_Wire):
    id: Id | None = None
    event: Text | None = None
    status_code: Status | None = None
    status: Status | None = None
    failure_code: Text | None = None
    failure_message: str | None = None
    failure_stage_code: Text | None = None
    client_ref: Annotated[str, Field(max_length=255)] | None = None
    cost: Cost | None = None
    cost_breakdown: Any = None
    node_runs: list[NodeRunIn] | None = None
    logs: list[LogIn] | None = None
    model: ModelRef | None = None
    model_id: Id | None = None
    flow_id: Id | None = None
    comfyui_workflow_id: Id | None = None
    batch_id: Id | None = None
    org_id: Id | None = None
    target_type: Text | None = None
    source_code: Text | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_ms: Duration | None = None
    input: Any = None
    output: Any = None
    metadata: Any = None


class RunEnvelope(_Wire):
    run_id: Id
    event: Text | None = None
    status: Status | None = None
    output: Any = None
    duration_ms: Duration | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    metadata: Any = None


class BatchItem(_Wire):
    run_id: Id
    status_code: Status | None = None
    status: Status | None = None
    client_ref: Annotated[str, Field(max_length=255)] | None = None


class BatchOutput(_Wire):
    items: list[BatchItem] = Field(default_factory=list)
    succeeded: int | None = None
    failed: int | None = None
    cancelled: int | None = None
    total: int | None = None


class BatchEnvelope(_Wire):
    batch_id: Id
    event: Text | None = None
    status: Status | None = None
    output: BatchOutput | None = None
    duration_ms: Duration | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    metadata: Any = None


# --- normalised, plain data -------------------------------------------------------------

RUN_FIELDS = (
    "org_id",
    "status",
    "event",
    "target_type",
    "model",
    "model_id",
    "flow_id",
    "comfyui_workflow_id",
    "batch_id",
    "client_ref",
    "source",
    "failure_code",
    "failure_message",
    "failure_stage",
    "duration_ms",
    "cost",
    "cost_breakdown",
    "created_at",
    "started_at",
    "completed_at",
    "input",
    "output",
    "metadata",
)


@dataclass
class RunPatch:
    """What one payload says about one run: ``fields`` holds only the values it carries."""

    run_id: str | None
    fields: dict[str, Any]
    client_ref_lookup: str | None = None


@dataclass
class ParsedPayload:
    kind: Literal["run_envelope", "batch_envelope", "run_object"]
    runs: list[RunPatch]
    batch: dict[str, Any] | None = None
    node_runs: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_id(self) -> str | None:
        return self.runs[0].run_id if self.kind != "batch_envelope" and self.runs else None

    @property
    def batch_id(self) -> str | None:
        return self.batch["id"] if self.batch else None


def as_utc(value: datetime | None) -> datetime | None:
    """Aware UTC datetimes; a naive one is taken to be UTC already."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _present(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def failure_from_output(output: Any) -> dict[str, Any]:
    """Failure code/message/stage from an error-shaped ``output`` (its shape is undocumented)."""
    if not isinstance(output, dict):
        return {}
    source: dict[str, Any] = output
    error = output.get("error")
    if isinstance(error, dict):
        source = error
    elif isinstance(error, str) and "message" not in output:
        source = {**output, "message": error}
    found = {
        "failure_code": source.get("code") or source.get("failure_code"),
        "failure_message": source.get("message") or source.get("failure_message"),
        "failure_stage": source.get("stage") or source.get("failure_stage_code"),
    }
    return {key: str(value) for key, value in found.items() if value is not None}


def _status(status: str | None, event: str | None) -> str | None:
    if status is not None:
        return status
    if event is not None:
        return EVENT_STATUS.get(event.strip().lower())
    return None


def _from_envelope(env: RunEnvelope) -> ParsedPayload:
    status = _status(env.status, env.event)
    failure: dict[str, Any] = {}
    if status == "failed" or (status is None and env.event is None):
        failure = failure_from_output(env.output)
        if status is None and failure:
            # Old deliveries have no event or status; an error-shaped output means failed.
            status = "failed"
    fields = _present(
        {
            "status": status,
            "event": env.event,
            "output": env.output,
            "duration_ms": env.duration_ms,
            "created_at": as_utc(env.created_at),
            "completed_at": as_utc(env.completed_at),
            "metadata": env.metadata,
            **failure,
        }
    )
    return ParsedPayload(kind="run_envelope", runs=[RunPatch(env.run_id, fields)])


def _from_run_object(run: RunObject) -> ParsedPayload:
    model_id = run.model_id or (run.model.id if run.model else None)
    slug = run.model.slug if run.model else None
    status = _status(run.status_code or run.status, run.event)
    fields = _present(
        {
            "org_id": run.org_id,
            "status": status,
            "event": run.event,
            "target_type": run.target_type,
            "model": slug or model_id,
            "model_id": model_id,
            "flow_id": run.flow_id,
            "comfyui_workflow_id": run.comfyui_workflow_id,
            "batch_id": run.batch_id,
            "client_ref": run.client_ref,
            "source": run.source_code,
            "failure_code": run.failure_code,
            "failure_message": run.failure_message,
            "failure_stage": run.failure_stage_code,
            "duration_ms": run.duration_ms,
            "cost": run.cost,
            "cost_breakdown": run.cost_breakdown,
            "created_at": as_utc(run.created_at),
            "started_at": as_utc(run.started_at),
            "completed_at": as_utc(run.completed_at),
            "input": run.input,
            "output": run.output,
            "metadata": run.metadata,
        }
    )
    if "duration_ms" not in fields and run.started_at and run.completed_at:
        delta = as_utc(run.completed_at) - as_utc(run.started_at)  # type: ignore[operator]
        fields["duration_ms"] = max(0, int(delta.total_seconds() * 1000))
    if status == "failed":
        for key, value in failure_from_output(run.output).items():
            fields.setdefault(key, value)
    node_runs = [
        {
            "id": node.id,
            "node_id": node.node_id,
            "node_type": node.node_type,
            "status": node.status_code or node.status,
            "failure_code": node.failure_code,
            "failure_message": node.failure_message,
            "created_at": as_utc(node.created_at),
            "started_at": as_utc(node.started_at),
            "completed_at": as_utc(node.completed_at),
            "duration_ms": node.duration_ms,
            "data": node.model_dump(mode="json", exclude_none=True),
        }
        for node in run.node_runs or []
    ]
    logs = [
        {
            "id": log.id,
            "node_run_id": log.node_run_id,
            "level": log.level,
            "message": log.message,
            "logged_at": as_utc(log.created_at or log.timestamp),
            "data": log.model_dump(mode="json", exclude_none=True),
        }
        for log in run.logs or []
    ]
    patch = RunPatch(run.id, fields, client_ref_lookup=None if run.id else run.client_ref)
    return ParsedPayload(kind="run_object", runs=[patch], node_runs=node_runs, logs=logs)


def _from_batch(env: BatchEnvelope) -> ParsedPayload:
    status = _status(env.status, env.event)
    output = env.output or BatchOutput()
    runs = [
        RunPatch(
            item.run_id,
            _present(
                {
                    "status": item.status_code or item.status,
                    "client_ref": item.client_ref,
                    "batch_id": env.batch_id,
                }
            ),
        )
        for item in output.items
    ]
    batch = {
        "id": env.batch_id,
        "event": env.event,
        "status": status,
        "succeeded": output.succeeded,
        "failed": output.failed,
        "cancelled": output.cancelled,
        "total": output.total,
        "duration_ms": env.duration_ms,
        "created_at": as_utc(env.created_at),
        "completed_at": as_utc(env.completed_at),
        "metadata": env.metadata,
    }
    return ParsedPayload(kind="batch_envelope", runs=runs, batch=batch)


def _details(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ".".join(str(part) for part in error["loc"]), "msg": error["msg"]}
        for error in exc.errors(include_url=False, include_input=False)
    ]


def parse_payload(document: dict[str, Any]) -> ParsedPayload:
    """Recognise and validate one JSON object; raises :class:`InvalidPayload` with details."""
    try:
        if "run_id" in document:
            return _from_envelope(RunEnvelope.model_validate(document))
        if "id" in document:
            return _from_run_object(RunObject.model_validate(document))
        if "batch_id" in document:
            return _from_batch(BatchEnvelope.model_validate(document))
        if document.get("client_ref") is not None:
            return _from_run_object(RunObject.model_validate(document))
    except ValidationError as exc:
        raise InvalidPayload("payload does not match its schema", _details(exc)) from None
    raise InvalidPayload(
        "unknown payload shape: expected run_id (callback), batch_id (batch callback), "
        "or id / client_ref (Run object)"
    )
