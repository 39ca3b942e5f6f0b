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
from datetime import UTC, datetime
from typing import Any

from receiver.vocabulary import TERMINAL_RANK, precedence

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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


# --- the same rules, incrementally: bounded work per delivery -----------------------------
#
# A stored row keeps, next to its values, which rank supplied each non-null field: a short
# list of ``[level, has_completed, completed_us, received_us, delivery_id, mask]`` entries,
# one per distinct rank that still owns a field, ``mask`` the bits (positions in the table's
# field tuple) of the fields it owns. A new payload's non-null field replaces the stored one
# exactly when the payload outranks the field's owner. The result is the fold's, field by
# field: each field holds the value of the highest-ranked payload that carried it, whatever
# the order the payloads arrived in; the cost is the number of fields, not the history.

Rank = tuple[int, int, int, int, int]
RankEntries = list[list[int]]


def _micros(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def payload_rank(
    status: str | None,
    completed_at: datetime | None,
    received_at: datetime,
    delivery_id: int,
) -> Rank:
    """The rank of one payload: as :func:`rank_key`, in integers (microseconds) for storage."""
    level = precedence(status)
    if level == TERMINAL_RANK and isinstance(completed_at, datetime):
        has_completed, completed = 1, _micros(completed_at)
    else:
        has_completed, completed = 0, 0
    return (level, has_completed, completed, _micros(received_at), delivery_id)


def merge_fields(
    entries: RankEntries | None,
    fields: Mapping[str, Any],
    rank: Rank,
    bits: Mapping[str, int],
) -> tuple[dict[str, Any], RankEntries]:
    """The fields of ``fields`` that win against the stored owners, and the new rank entries.

    ``bits`` maps each ranked field to its bit; fields not in it are ignored. A null never
    wins (it never erases). Entries are not modified in place.
    """
    current = [list(entry) for entry in entries or []]
    # The fields owned by a rank above this payload's: each entry is compared once, not once
    # per field (a Run object carries about twenty fields, a row keeps two or three entries).
    kept = 0
    for entry in current:
        if (entry[0], entry[1], entry[2], entry[3], entry[4]) > rank:
            kept |= entry[5]
    winners: dict[str, Any] = {}
    taken = 0
    for name, value in fields.items():
        if value is None:
            continue
        bit = bits.get(name)
        if bit is None or kept >> bit & 1:
            continue
        winners[name] = value
        taken |= 1 << bit
    if not taken:
        return winners, [entry for entry in current if entry[5]]
    mine = None
    for entry in current:
        entry[5] &= ~taken  # the owners this payload outranks lose what it won
        if (entry[0], entry[1], entry[2], entry[3], entry[4]) == rank:
            mine = entry
    if mine is None:
        current.append([*rank, taken])
    else:
        mine[5] |= taken
    return winners, [entry for entry in current if entry[5]]


def owned_fields(entries: RankEntries | None, bits: Mapping[str, int]) -> set[str]:
    """The fields the entries say are non-null."""
    mask = 0
    for entry in entries or []:
        mask |= entry[5]
    return {name for name, bit in bits.items() if mask & (1 << bit)}
