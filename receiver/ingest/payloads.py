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
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

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


# Limits below what PostgreSQL and the encoders can hold, so bad input is a 422, not a 500.
# Ids and indexed vocabulary fields are bounded in UTF-8 bytes: the widest index (runs'
# analytics window, id plus seven such fields plus cost) must stay under btree's ~2.7 KB row.
MAX_ID_BYTES = 255
MAX_LABEL_BYTES = 255
MAX_COST_DIGITS = 100
MAX_COST_EXPONENT = 1000
INT4_MAX = 2**31 - 1


def _decimal_text(value: object) -> object:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("cost must be a decimal string")
    if isinstance(value, int | float | str):
        if isinstance(value, str) and len(value) > 4 * MAX_COST_DIGITS:
            raise ValueError(f"cost must be at most {4 * MAX_COST_DIGITS} characters")
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            raise ValueError(f"cost {str(value)[:40]!r} is not a decimal number") from None
        if not number.is_finite():
            raise ValueError("cost must be finite")
        if len(number.as_tuple().digits) > MAX_COST_DIGITS:
            raise ValueError(f"cost must have at most {MAX_COST_DIGITS} significant digits")
        if number and abs(number.adjusted()) > MAX_COST_EXPONENT:
            raise ValueError(f"cost must be within 1e-{MAX_COST_EXPONENT}..1e{MAX_COST_EXPONENT}")
        return number
    raise ValueError("cost must be a decimal string")


def _utf8_at_most(limit: int) -> AfterValidator:
    def check(value: str) -> str:
        if len(value.encode("utf-8", "surrogatepass")) > limit:
            raise ValueError(f"must be at most {limit} bytes (UTF-8)")
        return value

    return AfterValidator(check)


# Accepted instants, in UTC. Python's datetime ends at years 1 and 9999, and asyncpg writes
# its extreme values as PostgreSQL's -infinity/infinity: a day of margin keeps both out.
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)


def _in_utc(value: datetime) -> datetime:
    """Aware UTC; naive is taken as UTC. Outside EARLIEST..LATEST once in UTC fails."""
    try:
        moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        moment = None
    if moment is None or not EARLIEST <= moment <= LATEST:
        raise ValueError("datetime is out of range once in UTC (0001-01-02 to 9999-12-30 accepted)")
    return moment


Status = Annotated[Literal[STATUSES], BeforeValidator(_status_word)]  # type: ignore[valid-type]
Id = Annotated[str, BeforeValidator(_id_text), Field(min_length=1), _utf8_at_most(MAX_ID_BYTES)]
# Open vocabularies that are indexed (failure codes, stages, models, sources...).
Text = Annotated[str, BeforeValidator(_id_text), _utf8_at_most(MAX_LABEL_BYTES)]
Cost = Annotated[Decimal, BeforeValidator(_decimal_text)]
Duration = Annotated[int, Field(ge=0, le=10**12)]
Count = Annotated[int, Field(ge=0, le=INT4_MAX)]
Timestamp = Annotated[datetime, AfterValidator(_in_utc)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


_W = TypeVar("_W", bound=_Wire)


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
    created_at: Timestamp | None = None
    started_at: Timestamp | None = None
    completed_at: Timestamp | None = None
    duration_ms: Duration | None = None


class LogIn(_Wire):
    id: Id
    level: Text | None = None
    message: str | None = None
    node_run_id: Id | None = None
    created_at: Timestamp | None = None
    timestamp: Timestamp | None = None


class RunObject(_Wire):
    """The seed's Run object and the official JS SDK's (``model`` "owner/slug", ``finished_at``,
    top-level ``error: {code, message}``), both."""

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
    model: ModelRef | Text | None = None
    model_id: Id | None = None
    flow_id: Id | None = None
    comfyui_workflow_id: Id | None = None
    batch_id: Id | None = None
    org_id: Id | None = None
    target_type: Text | None = None
    source_code: Text | None = None
    created_at: Timestamp | None = None
    started_at: Timestamp | None = None
    completed_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    duration_ms: Duration | None = None
    error: Any = None
    input: Any = None
    output: Any = None
    metadata: Any = None


class RunEnvelope(_Wire):
    run_id: Id
    event: Text | None = None
    status: Status | None = None
    output: Any = None
    duration_ms: Duration | None = None
    created_at: Timestamp | None = None
    completed_at: Timestamp | None = None
    metadata: Any = None


class BatchItem(_Wire):
    run_id: Id
    status_code: Status | None = None
    status: Status | None = None
    client_ref: Annotated[str, Field(max_length=255)] | None = None


class BatchOutput(_Wire):
    items: list[BatchItem] = Field(default_factory=list)
    succeeded: Count | None = None
    failed: Count | None = None
    cancelled: Count | None = None
    total: Count | None = None


class BatchEnvelope(_Wire):
    batch_id: Id
    event: Text | None = None
    status: Status | None = None
    output: BatchOutput | None = None
    duration_ms: Duration | None = None
    created_at: Timestamp | None = None
    completed_at: Timestamp | None = None
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
    # Wrong-typed descriptive values left out of the run ({"loc", "msg"}); kept in the archive.
    set_aside: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_id(self) -> str | None:
        return self.runs[0].run_id if self.kind != "batch_envelope" and self.runs else None

    @property
    def batch_id(self) -> str | None:
        return self.batch["id"] if self.batch else None


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


def _bounded_failure(found: dict[str, Any], where: str) -> dict[str, Any]:
    """Failure fields read from an error object, held to the indexed fields' limits."""
    for key in ("failure_code", "failure_stage"):
        value = found.get(key)
        if value is not None and len(value.encode("utf-8", "surrogatepass")) > MAX_LABEL_BYTES:
            raise InvalidPayload(
                "payload does not match its schema",
                [{"loc": f"{where}.{key}", "msg": f"must be at most {MAX_LABEL_BYTES} bytes"}],
            )
    return found


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
        failure = _bounded_failure(failure_from_output(env.output), "output")
        if status is None and failure:
            # Old deliveries have no event or status; an error-shaped output means failed.
            status = "failed"
    fields = _present(
        {
            "status": status,
            "event": env.event,
            "output": env.output,
            "duration_ms": env.duration_ms,
            "created_at": env.created_at,
            "completed_at": env.completed_at,
            "metadata": env.metadata,
            **failure,
        }
    )
    return ParsedPayload(kind="run_envelope", runs=[RunPatch(env.run_id, fields)])


def _from_run_object(run: RunObject) -> ParsedPayload:
    model_id: str | None
    slug: str | None
    if isinstance(run.model, str):
        # The SDK's "owner/slug": that is the model's name as Runflow shows it.
        model_id, slug = run.model_id, run.model
    else:
        model_id = run.model_id or (run.model.id if run.model else None)
        slug = run.model.slug if run.model else None
    completed_at = run.completed_at or run.finished_at
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
            "created_at": run.created_at,
            "started_at": run.started_at,
            "completed_at": completed_at,
            "input": run.input,
            "output": run.output,
            "metadata": run.metadata,
        }
    )
    if "duration_ms" not in fields and run.started_at and completed_at:
        delta = completed_at - run.started_at
        fields["duration_ms"] = min(10**12, max(0, int(delta.total_seconds() * 1000)))
    if run.error is not None:
        # The SDK's top-level error: {code, message}.
        found = failure_from_output({"error": run.error})
        for key, value in _bounded_failure(found, "error").items():
            fields.setdefault(key, value)
    if status == "failed":
        for key, value in _bounded_failure(failure_from_output(run.output), "output").items():
            fields.setdefault(key, value)
    node_runs = [
        {
            "id": node.id,
            "node_id": node.node_id,
            "node_type": node.node_type,
            "status": node.status_code or node.status,
            "failure_code": node.failure_code,
            "failure_message": node.failure_message,
            "created_at": node.created_at,
            "started_at": node.started_at,
            "completed_at": node.completed_at,
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
            "logged_at": log.created_at or log.timestamp,
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
        "created_at": env.created_at,
        "completed_at": env.completed_at,
        "metadata": env.metadata,
    }
    return ParsedPayload(kind="batch_envelope", runs=runs, batch=batch)


def _details(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ".".join(str(part) for part in error["loc"]), "msg": error["msg"]}
        for error in exc.errors(include_url=False, include_input=False)
    ]


# Descriptive fields: a wrong-typed value is set aside (kept in the archive, named on the
# delivery) instead of rejecting the run. Identity, status, timestamps and the bounds above
# always validate strictly.
_DESCRIPTIVE = frozenset({"model", "metadata", "cost_breakdown", "failure_message"})
_CHILD_DESCRIPTIVE = {
    "node_runs": frozenset({"node_id", "node_type", "failure_message", "preview"}),
    "logs": frozenset({"level", "message"}),
}
# Errors that mean "too big for the database", never set aside.
_BOUND_ERRORS = frozenset(
    {
        "string_too_long",
        "string_too_short",
        "too_long",
        "too_short",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "value_error",
    }
)


def _descriptive_path(loc: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    if loc and loc[0] in _DESCRIPTIVE:
        return loc[:1]
    if (
        len(loc) >= 3
        and loc[0] in _CHILD_DESCRIPTIVE
        and isinstance(loc[1], int)
        and loc[2] in _CHILD_DESCRIPTIVE[str(loc[0])]
    ):
        return loc[:3]
    return None


def _without(document: dict[str, Any], path: tuple[int | str, ...]) -> dict[str, Any]:
    """A copy of ``document`` without the value at ``path`` (the original is untouched)."""
    out = dict(document)
    if len(path) == 1:
        out.pop(str(path[0]), None)
        return out
    children = list(out[str(path[0])])
    index = int(path[1])
    children[index] = {k: v for k, v in children[index].items() if k != path[2]}
    out[str(path[0])] = children
    return out


def _validate(model: type[_W], document: dict[str, Any]) -> tuple[_W, list[dict[str, Any]]]:
    """The validated model and what was set aside to get it; InvalidPayload otherwise."""
    try:
        return model.model_validate(document), []
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        aside: dict[tuple[int | str, ...], str] = {}
        for error in errors:
            path = _descriptive_path(error["loc"])
            if model is not RunObject or path is None or error["type"] in _BOUND_ERRORS:
                raise InvalidPayload("payload does not match its schema", _details(exc)) from None
            aside.setdefault(path, error["msg"])
    pruned = document
    for path in aside:
        pruned = _without(pruned, path)
    try:
        validated = model.model_validate(pruned)
    except ValidationError as exc:
        raise InvalidPayload("payload does not match its schema", _details(exc)) from None
    set_aside = [{"loc": ".".join(str(p) for p in path), "msg": msg} for path, msg in aside.items()]
    return validated, set_aside


def _null_identity(name: str) -> InvalidPayload:
    return InvalidPayload(
        "payload does not match its schema", [{"loc": name, "msg": f"{name} must not be null"}]
    )


def _run_object(document: dict[str, Any]) -> ParsedPayload:
    run, set_aside = _validate(RunObject, document)
    parsed = _from_run_object(run)
    parsed.set_aside = set_aside
    return parsed


def parse_payload(document: dict[str, Any]) -> ParsedPayload:
    """Recognise and validate one JSON object; raises :class:`InvalidPayload` with details."""
    if "run_id" in document:
        if document["run_id"] is None:
            raise _null_identity("run_id")
        return _from_envelope(_validate(RunEnvelope, document)[0])
    if "id" in document:
        if document["id"] is None and document.get("client_ref") is None:
            raise _null_identity("id")
        return _run_object(document)
    if "batch_id" in document:
        if document["batch_id"] is None:
            raise _null_identity("batch_id")
        return _from_batch(_validate(BatchEnvelope, document)[0])
    if document.get("client_ref") is not None:
        return _run_object(document)
    raise InvalidPayload(
        "unknown payload shape: expected run_id (callback), batch_id (batch callback), "
        "or id / client_ref (Run object)"
    )
