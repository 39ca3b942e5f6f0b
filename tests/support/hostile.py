"""Hypothesis strategies for hostile Runflow deliveries: every shape the receiver accepts
(SPEC section 1: envelopes, batch callbacks, Run objects as the docs and as Runflow's JS SDK
type them), with odd values where values go.

A document is built as Python data and serialised by ``to_bytes``; what plain JSON
serialisation cannot say (nesting deeper than Python's recursion, numbers beyond float, lone
surrogates as ``\\ud800`` escapes) is spliced in as raw text through ``Raw`` placeholders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Raw:
    """JSON text to put where this value stands, as is."""

    text: str


def to_bytes(doc: Any) -> bytes:
    """``doc`` as JSON bytes, each ``Raw`` replaced by its text."""
    raws: list[str] = []

    def default(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x01RAW{len(raws) - 1}\x01"
        raise TypeError(type(value).__name__)

    # ensure_ascii: a lone surrogate in a str becomes the escape \ud800, as hostile senders do.
    text = json.dumps(doc, default=default, ensure_ascii=True)
    for index, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x01RAW{index}\x01"), raw, 1)
    return text.encode()


ODD_DATETIMES = [
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59-23:59",
    "9999-12-31T23:59:59.999999+00:00",
    "1969-12-31T23:59:59Z",
    "2026-02-30T00:00:00Z",
    "2026-11-28T24:00:00Z",
    "2026-11-28T12:00:00.123456789Z",
    "2026-11-28T12:00:00+14:00",
    "2026-11-28T12:00:00-12:00",
    "2026-11-28 12:00:00",
    "2026-11-28",
    "+275760-09-13T00:00:00Z",
    "now",
    "",
    "\x00",
]
HUGE_NUMBERS = [
    Raw("1e999"),
    Raw("-1e999"),
    Raw("1" + "0" * 400),
    Raw("123456789012345678901234567890.5"),
    Raw("-0"),
    Raw("1E-400"),
    2**63,
    -(2**63) - 1,
    2**64,
    10**30,
    1.7976931348623157e308,
    -1,
    0,
]
SURROGATES = ["\ud800", "\udfff", "a\ud83dz", "\udc00\ud800"]


def _deep(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * depth + "1" + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


def odd_strings() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from(SURROGATES),
        st.text(max_size=20).map(lambda s: s + "\x00" + s),
        st.integers(min_value=256, max_value=300_000).map(lambda n: "x" * n),
        st.sampled_from(["../../admin", "%2e%2e/", "a/b?c#d", " ", "null", "🙂" * 50]),
    )


def odd_values() -> st.SearchStrategy[Any]:
    """Anything at all where a value goes: wrong types, nulls, extremes, deep nesting."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(HUGE_NUMBERS),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        odd_strings(),
        st.sampled_from(ODD_DATETIMES),
        st.builds(
            _deep, st.sampled_from([2, 50, 1000, 5000, 100_000]), st.sampled_from(["list", "obj"])
        ),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    )


def maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, one time in twelve a hostile one: a document of a dozen
    fields then has one or two odd values, and often enough none, so deliveries get past
    parsing into the archive and the merge as well as into every rejection."""
    odd = odd_values()
    return st.integers(min_value=0, max_value=11).flatmap(lambda n: odd if n == 0 else good)


def _iso(offset_seconds: int) -> str:
    return (T0 + timedelta(seconds=offset_seconds)).isoformat()


def datetimes() -> st.SearchStrategy[Any]:
    return maybe(st.integers(min_value=-(10**6), max_value=10**6).map(_iso))


def run_ids() -> st.SearchStrategy[Any]:
    # A small pool, so deliveries collide on runs and go through the merge rules.
    return maybe(st.sampled_from([f"run_h{i}" for i in range(12)]))


STATUSES = [
    "queued",
    "dispatching",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "canceled",
    "partial_succeeded",
    "SUCCEEDED",
    "exploded",
]
EVENTS = ["run.completed", "run.failed", "run.cancelled", "run.partial_succeeded", "run.odd"]


def _drop(doc: dict[str, Any], absent: list[str]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in absent}


def _fields(strategies: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A document of these fields, with some of them left out."""
    return st.builds(
        _drop,
        st.fixed_dictionaries(strategies),
        st.lists(st.sampled_from(sorted(strategies)), max_size=3),
    )


def error_objects() -> st.SearchStrategy[Any]:
    return maybe(
        st.fixed_dictionaries(
            {"code": maybe(st.sampled_from(["oom", "timeout", ""])), "message": maybe(st.text())},
            optional={"stage": maybe(st.sampled_from(["execution", "dispatch"]))},
        )
    )


def envelopes() -> st.SearchStrategy[dict[str, Any]]:
    """The per-run callback envelope (SPEC section 1)."""
    return _fields(
        {
            "event": maybe(st.sampled_from(EVENTS)),
            "run_id": run_ids(),
            "status": maybe(st.sampled_from(STATUSES)),
            "output": maybe(
                st.one_of(
                    st.none(),
                    st.just({"images": ["a.png"]}),
                    st.builds(dict, error=error_objects()),
                )
            ),
            "duration_ms": maybe(st.integers(min_value=0, max_value=10**7)),
            "created_at": datetimes(),
            "completed_at": datetimes(),
            "metadata": maybe(
                st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
            ),
        }
    )


def batch_items() -> st.SearchStrategy[Any]:
    item = _fields(
        {
            "run_id": run_ids(),
            "status_code": maybe(st.sampled_from(STATUSES)),
            "client_ref": maybe(st.text(max_size=20)),
        }
    )
    return maybe(st.lists(maybe(item), max_size=6))


def batch_callbacks() -> st.SearchStrategy[dict[str, Any]]:
    return _fields(
        {
            "event": maybe(st.sampled_from(["batch.succeeded", "batch.failed", "batch.cancelled"])),
            "batch_id": maybe(st.sampled_from([f"batch_h{i}" for i in range(4)])),
            "status": st.none(),
            "output": maybe(
                st.fixed_dictionaries(
                    {"items": batch_items()},
                    optional={
                        "succeeded": maybe(st.integers(0, 10)),
                        "failed": maybe(st.integers(0, 10)),
                        "total": maybe(st.integers(0, 10)),
                    },
                )
            ),
            "duration_ms": maybe(st.integers(min_value=0, max_value=10**7)),
            "created_at": datetimes(),
            "completed_at": datetimes(),
        }
    )


def node_runs() -> st.SearchStrategy[Any]:
    node = _fields(
        {
            "id": maybe(st.sampled_from(["n1", "n2", "n3"])),
            "node_id": maybe(st.text(max_size=10)),
            "status_code": maybe(st.sampled_from(STATUSES)),
            "failure_code": maybe(st.text(max_size=10)),
            "started_at": datetimes(),
            "completed_at": datetimes(),
            "duration_ms": maybe(st.integers(0, 10**6)),
        }
    )
    return maybe(st.lists(maybe(node), max_size=4))


def _common_run_fields() -> dict[str, st.SearchStrategy[Any]]:
    return {
        "id": run_ids(),
        "client_ref": maybe(st.sampled_from(["ref-a", "ref-b", None])),
        "cost": maybe(st.sampled_from(["0.0125", "1e3", "-1", "NaN", "0." + "1" * 200, 3.5])),
        "batch_id": maybe(st.none()),
        "org_id": maybe(st.sampled_from(["org_1", "org_2"])),
        "target_type": maybe(st.sampled_from(["model", "flow", "comfyui"])),
        "created_at": datetimes(),
        "started_at": datetimes(),
        "duration_ms": maybe(st.integers(0, 10**7)),
        "node_runs": node_runs(),
        "logs": maybe(
            st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=5)), max_size=3)
        ),
    }


def run_objects() -> st.SearchStrategy[dict[str, Any]]:
    """A Run object as the docs' schema has it (``status_code``, nested ``model``)."""
    return _fields(
        {
            **_common_run_fields(),
            "status_code": maybe(st.sampled_from(STATUSES)),
            "failure_code": maybe(st.sampled_from(["oom", "timeout", None])),
            "failure_message": maybe(st.text(max_size=30)),
            "failure_stage_code": maybe(st.sampled_from(["execution", "dispatch", None])),
            "cost_breakdown": maybe(st.dictionaries(st.text(max_size=5), st.text(max_size=5))),
            "model": maybe(
                st.fixed_dictionaries(
                    {"id": maybe(st.text(max_size=10)), "slug": maybe(st.text(max_size=20))}
                )
            ),
            "source_code": maybe(st.sampled_from(["api", "playground", "flow-node"])),
            "completed_at": datetimes(),
        }
    )


def sdk_runs() -> st.SearchStrategy[dict[str, Any]]:
    """A Run as Runflow's JS SDK types it: ``model`` "owner/slug", ``finished_at``, ``error``."""
    return _fields(
        {
            **_common_run_fields(),
            "status": maybe(st.sampled_from(STATUSES)),
            "model": maybe(st.sampled_from(["black-forest/flux-dev", "a/b/c", "/", "noslash"])),
            "finished_at": datetimes(),
            "error": error_objects(),
        }
    )


def deliveries() -> st.SearchStrategy[dict[str, Any]]:
    """Any of the four shapes, or one of them with a hostile top-level value added."""
    shape = st.one_of(envelopes(), batch_callbacks(), run_objects(), sdk_runs())
    extra = st.dictionaries(
        st.sampled_from(["extra", "run_id", "id", "batch_id"]), odd_values(), max_size=1
    )
    return st.builds(lambda doc, more: {**doc, **more}, shape, st.one_of(st.just({}), extra))
