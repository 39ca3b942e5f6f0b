"""Query-string parsing shared by /runs, /deliveries and the analytics routes.

Every parameter is validated here: anything unknown or malformed is a 422 ``invalid_query``
that names the parameter, never a 500 and never a silently ignored typo.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.datastructures import QueryParams

from receiver.errors import InvalidQuery
from receiver.vocabulary import normalise_status

# /runs filters: query parameter -> runs column.
FILTER_COLUMNS = {
    "status": "status",
    "failure_code": "failure_code",
    "failure_stage": "failure_stage",
    "model": "model",
    "target_type": "target_type",
    "source": "source",
    "client_ref": "client_ref",
    "batch_id": "batch_id",
    "org_id": "org_id",
}
WINDOW_PARAMS = ("created_after", "created_before")
# Dimensions analytics may group by; the values are the runs columns.
DIMENSIONS = {
    "failure_code": "failure_code",
    "failure_stage": "failure_stage",
    "model": "model",
    "target_type": "target_type",
    "source": "source",
    "status": "status",
    "org_id": "org_id",
}
HIGH_CARDINALITY = {"id", "run_id", "client_ref", "batch_id"}
DEFAULT_WINDOW = timedelta(hours=24)
# The longest window analytics reads: a year (and a leap day) of runs, not a century.
MAX_WINDOW = timedelta(days=366)
INT64 = (-(2**63), 2**63 - 1)


@dataclass
class RunFilters:
    """Validated /runs filters; each list holds the accepted values of one column."""

    values: dict[str, list[str]] = field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None


# "...T10:00:00+00:00" sent without URL-encoding the "+" arrives as "...T10:00:00 00:00".
_UNENCODED_PLUS = re.compile(r"(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}:?\d{2})$")


def parse_datetime(name: str, raw: str) -> datetime:
    text = _UNENCODED_PLUS.sub(r"\1+\2", raw.strip())
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        # OverflowError: "0001-01-01T00:00:00+01:00" is before the first representable UTC day.
        raise InvalidQuery(
            f"{name} must be an ISO 8601 datetime between 1970 and 2200",
            [{"param": name, "value": raw}],
        ) from None
    if not 1970 <= moment.year <= 2200:
        raise InvalidQuery(f"{name} must be between 1970 and 2200", [{"param": name}])
    return moment


def _status(value: str) -> str:
    """A status as stored: "canceled" (Runflow's spelling on runs) is "cancelled"."""
    try:
        return str(normalise_status(value))
    except ValueError as exc:
        raise InvalidQuery(str(exc), [{"param": "status", "value": value}]) from None


def check_known(params: QueryParams, allowed: set[str]) -> None:
    unknown = sorted(set(params.keys()) - allowed)
    if unknown:
        raise InvalidQuery(
            f"unknown query parameter(s): {', '.join(unknown)}",
            [{"param": name, "allowed": sorted(allowed)} for name in unknown],
        )


def parse_filters(params: QueryParams) -> RunFilters:
    filters = RunFilters()
    for name in FILTER_COLUMNS:
        values = [v.strip() for raw in params.getlist(name) for v in raw.split(",") if v.strip()]
        if any("\x00" in value for value in values):
            raise InvalidQuery(f"{name} contains a NUL character", [{"param": name}])
        if name == "status":
            values = [_status(value) for value in values]
        if values:
            filters.values[name] = values
    if "created_after" in params:
        filters.created_after = parse_datetime("created_after", params["created_after"])
    if "created_before" in params:
        filters.created_before = parse_datetime("created_before", params["created_before"])
    if (
        filters.created_after is not None
        and filters.created_before is not None
        and filters.created_after >= filters.created_before
    ):
        raise InvalidQuery("created_after must be before created_before")
    return filters


def with_default_window(filters: RunFilters, now: datetime | None = None) -> RunFilters:
    """Analytics windows default to the last 24 hours (or 24 hours before/after one bound)."""
    now = now or datetime.now(UTC)
    before = filters.created_before
    after = filters.created_after
    if before is None and after is None:
        before = now
        after = now - DEFAULT_WINDOW
    elif before is None:
        assert after is not None
        before = max(now, after + timedelta(microseconds=1))
    elif after is None:
        after = before - DEFAULT_WINDOW
    if before - after > MAX_WINDOW:
        raise InvalidQuery(
            f"the window spans {(before - after).days} days; at most {MAX_WINDOW.days}:"
            " narrow created_after/created_before",
            [{"param": "created_after"}, {"param": "created_before"}],
        )
    return RunFilters(dict(filters.values), after, before)


def parse_limit(params: QueryParams, default: int = 50, maximum: int = 500) -> int:
    raw = params.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        raise InvalidQuery("limit must be an integer", [{"param": "limit", "value": raw}]) from None
    if not 1 <= limit <= maximum:
        raise InvalidQuery(f"limit must be between 1 and {maximum}", [{"param": "limit"}])
    return limit


def parse_group_by(params: QueryParams, default: list[str], *, most: int = 3) -> list[str]:
    raw = params.get("group_by")
    if raw is None:
        return list(default)
    names = [part.strip() for part in raw.split(",") if part.strip()]
    for name in names:
        if name in HIGH_CARDINALITY:
            raise InvalidQuery(
                f"cannot group by {name}: one group per run is not a breakdown; filter by it",
                [{"param": "group_by", "value": name}],
            )
        if name not in DIMENSIONS:
            raise InvalidQuery(
                f"unknown dimension {name!r}; use one of {', '.join(DIMENSIONS)}",
                [{"param": "group_by", "value": name}],
            )
    if len(set(names)) != len(names):
        raise InvalidQuery("group_by names a dimension twice", [{"param": "group_by"}])
    if len(names) > most:
        raise InvalidQuery(f"group_by takes at most {most} dimensions", [{"param": "group_by"}])
    return names


def encode_cursor(*values: Any) -> str:
    raw = orjson.dumps([v.isoformat() if isinstance(v, datetime) else v for v in values])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(params: QueryParams, kinds: tuple[type, ...]) -> tuple[Any, ...] | None:
    """The position an opaque cursor names, checked against the expected value types."""
    raw = params.get("cursor")
    if raw is None or raw == "":
        return None
    try:
        values = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if not isinstance(values, list) or len(values) != len(kinds):
            raise ValueError
        out: list[Any] = []
        for value, kind in zip(values, kinds, strict=True):
            if kind is datetime:
                # Only what the API issues: an aware datetime that PostgreSQL can compare.
                moment = datetime.fromisoformat(value)
                if moment.tzinfo is None:
                    raise ValueError
                out.append(moment.astimezone(UTC))
            elif (
                not isinstance(value, kind)
                or (isinstance(value, int) and not INT64[0] <= value <= INT64[1])
                or isinstance(value, bool)
                or (isinstance(value, str) and "\x00" in value)
            ):
                raise ValueError
            else:
                out.append(value)
        return tuple(out)
    except (ValueError, TypeError, OverflowError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidQuery("cursor is not one this API issued", [{"param": "cursor"}]) from None
