"""The merge rules of SPEC section 2, as pure functions over plain data.

A run's row is a fold of every stored payload that touched it, taken in rank order:

1. status precedence ``queued < dispatching < running < terminal``;
2. between terminal payloads the later ``completed_at`` ranks higher (a payload that has one
   outranks one that lacks it); equal or missing, the later received ranks higher;
3. each payload's non-null fields overwrite what lower-ranked payloads said, so a stale
   payload only fills fields nothing better has filled, and a null never erases a value.

Folding in rank order rather than arrival order is what makes any arrival order converge to
the same row: a stale payload that arrives last lands exactly where it would have if it had
arrived first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from receiver.vocabulary import TERMINAL_RANK, precedence


@dataclass(frozen=True)
class StoredPatch:
    """One payload's fields for one run, with what the ranking needs."""

    fields: Mapping[str, Any]
    received_at: datetime
    delivery_id: int


def rank_key(patch: StoredPatch) -> tuple[int, int, float, datetime, int]:
    """Sort key: precedence, then (terminal only) completed_at, then arrival."""
    level = precedence(patch.fields.get("status"))
    completed = patch.fields.get("completed_at")
    if level == TERMINAL_RANK and isinstance(completed, datetime):
        has_completed, completed_ts = 1, completed.timestamp()
    else:
        has_completed, completed_ts = 0, 0.0
    return (level, has_completed, completed_ts, patch.received_at, patch.delivery_id)


@dataclass(frozen=True)
class MergedRun:
    fields: dict[str, Any]
    first_received_at: datetime
    last_received_at: datetime
    delivery_count: int


def fold_run(patches: Iterable[StoredPatch]) -> MergedRun:
    """The current row of a run from every payload stored for it (at least one)."""
    ordered = sorted(patches, key=rank_key)
    if not ordered:
        raise ValueError("a run needs at least one payload")
    fields: dict[str, Any] = {}
    for patch in ordered:
        fields.update((key, value) for key, value in patch.fields.items() if value is not None)
    received = [patch.received_at for patch in ordered]
    return MergedRun(
        fields=fields,
        first_received_at=min(received),
        last_received_at=max(received),
        delivery_count=len(ordered),
    )
