from datetime import UTC, datetime
from decimal import Decimal

import pytest

from receiver.errors import InvalidPayload
from receiver.ingest.payloads import failure_from_output, parse_payload
from tests.support.builders import batch_envelope, envelope, run_object


@pytest.mark.parametrize("spelling", ["canceled", "cancelled", "CANCELED"])
def test_both_cancel_spellings_store_cancelled(spelling):
    parsed = parse_payload(envelope("r1", status=spelling, event="run.cancelled"))
    assert parsed.runs[0].fields["status"] == "cancelled"
    parsed = parse_payload(run_object("r1", status_code=spelling))
    assert parsed.runs[0].fields["status"] == "cancelled"


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-11-01T12:00:03+00:00",
        "2026-11-01T12:00:03.123456+00:00",
        "2026-11-01T12:00:03.5+00:00",
    ],
)
def test_datetimes_with_and_without_fractions_are_utc(stamp):
    parsed = parse_payload({"run_id": "r1", "status": "succeeded", "completed_at": stamp})
    completed = parsed.runs[0].fields["completed_at"]
    assert completed.tzinfo is not None
    assert completed.utcoffset().total_seconds() == 0
    assert completed.replace(microsecond=0) == datetime(2026, 11, 1, 12, 0, 3, tzinfo=UTC)


def test_old_delivery_without_event_and_status_is_accepted():
    parsed = parse_payload({"run_id": "r1", "output": {"images": []}, "duration_ms": 5})
    assert parsed.runs[0].fields.get("status") is None
    assert parsed.runs[0].fields["duration_ms"] == 5


def test_old_delivery_with_error_output_counts_as_failed():
    parsed = parse_payload({"run_id": "r1", "output": {"code": "timeout", "message": "slow"}})
    assert parsed.runs[0].fields["status"] == "failed"
    assert parsed.runs[0].fields["failure_code"] == "timeout"


def test_event_gives_status_when_status_is_missing():
    parsed = parse_payload({"run_id": "r1", "event": "run.partial_succeeded"})
    assert parsed.runs[0].fields["status"] == "partial_succeeded"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            {"error": {"code": "oom", "message": "out of memory", "stage": "execution"}},
            {
                "failure_code": "oom",
                "failure_message": "out of memory",
                "failure_stage": "execution",
            },
        ),
        (
            {"code": "nsfw", "message": "blocked", "stage": "dispatch"},
            {"failure_code": "nsfw", "failure_message": "blocked", "failure_stage": "dispatch"},
        ),
        ({"error": "boom"}, {"failure_message": "boom"}),
        ("not an object", {}),
        (None, {}),
    ],
)
def test_failure_details_inside_output(output, expected):
    assert failure_from_output(output) == expected


def test_run_object_maps_to_run_fields():
    parsed = parse_payload(
        run_object(
            "r9",
            status_code="failed",
            failure_code="gpu_lost",
            failure_stage_code="execution",
            client_ref="order-7",
            cost="0.0300",
            source_code="flow-node",
            node_runs=[{"id": "n1", "status_code": "failed", "failure_code": "gpu_lost"}],
            logs=[{"id": "l1", "level": "error", "message": "lost"}],
        )
    )
    fields = parsed.runs[0].fields
    assert fields["model"] == "flux-dev" and fields["model_id"] == "mdl_flux"
    assert fields["cost"] == Decimal("0.0300")
    assert fields["source"] == "flow-node"
    assert fields["failure_stage"] == "execution"
    assert parsed.node_runs[0]["id"] == "n1" and parsed.node_runs[0]["status"] == "failed"
    assert parsed.logs[0]["message"] == "lost"


def test_model_falls_back_to_model_id_without_slug():
    parsed = parse_payload(run_object("r1", model=None, model_id="mdl_x"))
    assert parsed.runs[0].fields["model"] == "mdl_x"


def test_batch_items_become_run_patches():
    parsed = parse_payload(
        batch_envelope("b1", [{"run_id": "a", "status_code": "failed", "client_ref": "x"}])
    )
    assert parsed.kind == "batch_envelope" and parsed.batch_id == "b1"
    assert parsed.runs[0].run_id == "a"
    assert parsed.runs[0].fields == {"status": "failed", "client_ref": "x", "batch_id": "b1"}
    assert parsed.batch is not None and parsed.batch["status"] == "succeeded"


def test_client_ref_only_payload_asks_for_lookup():
    parsed = parse_payload({"client_ref": "order-1", "status_code": "failed"})
    assert parsed.runs[0].run_id is None
    assert parsed.runs[0].client_ref_lookup == "order-1"


@pytest.mark.parametrize(
    ("document", "loc"),
    [
        ({"run_id": "r1", "duration_ms": "slow"}, "duration_ms"),
        ({"run_id": "r1", "status": "exploded"}, "status"),
        ({"run_id": "r1", "completed_at": "yesterday"}, "completed_at"),
        ({"id": "r1", "cost": "cheap"}, "cost"),
        ({"id": "r1", "client_ref": "x" * 256}, "client_ref"),
        ({"run_id": ""}, "run_id"),
        ({"run_id": ["r1"]}, "run_id"),
    ],
)
def test_schema_violations_name_the_field(document, loc):
    with pytest.raises(InvalidPayload) as caught:
        parse_payload(document)
    assert any(detail["loc"] == loc for detail in caught.value.details)


def test_unknown_shape_is_invalid_payload():
    with pytest.raises(InvalidPayload, match="unknown payload shape"):
        parse_payload({"hello": "world"})
