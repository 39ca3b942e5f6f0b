"""The one back-off: exponential with full jitter, and the one ``Retry-After`` reader.

Full jitter (a uniform draw between zero and the exponential ceiling) spreads retries of many
clients that failed together; a server's ``Retry-After`` is a floor, never more than the cap.
Used for Runflow's API (enrichment, backfill, reconciliation) and for alert hooks.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def full_jitter(
    attempt: int, *, base: float, cap: float, retry_after: float | None = None
) -> float:
    """Seconds to wait before try ``attempt + 1``: uniform in [0, min(cap, base * 2^(attempt-1))].

    ``retry_after`` (what the server asked for) raises the draw to at least that, bounded by
    ``cap`` so a hostile or confused server cannot park a worker for a day.
    """
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    delay = random.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(max(retry_after, 0.0), cap))
    return delay


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (RFC 9110 10.2.3), or None when unreadable.

    Reads both forms: delta-seconds (``120``; a decimal like ``0.5`` is accepted too) and an
    HTTP-date (``Wed, 21 Oct 2026 07:28:00 GMT``), which counts from ``now``; a date in the
    past means "now" (0).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000" or no zone: RFC 9110 dates are always GMT
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())
