"""The receiver's vocabulary: run statuses and their precedence, and the words the archive uses.

Pure and dependency-free: the merge, analytics, alerts and query parsing import it, and it
imports nothing of the wire formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled", "partial_succeeded")
STATUSES = ("queued", "dispatching", "running", *TERMINAL_STATUSES)

# Status precedence (SPEC section 2, rule 1): a payload never moves a run backwards.
PRECEDENCE: Mapping[str, int] = {
    "queued": 0,
    "dispatching": 1,
    "running": 2,
    **dict.fromkeys(TERMINAL_STATUSES, 3),
}
TERMINAL_RANK = 3
# A payload with no (or an unknown) status says nothing about progress: it only fills gaps.
NO_STATUS_RANK = -1

_STATUS_ALIASES = {
    "canceled": "cancelled",
    "completed": "succeeded",
    "success": "succeeded",
    "partially_succeeded": "partial_succeeded",
    "partial_success": "partial_succeeded",
}
EVENT_STATUS: Mapping[str, str] = {
    "run.completed": "succeeded",
    "run.succeeded": "succeeded",
    "run.failed": "failed",
    "run.cancelled": "cancelled",
    "run.canceled": "cancelled",
    "run.partial_succeeded": "partial_succeeded",
    "batch.succeeded": "succeeded",
    "batch.completed": "succeeded",
    "batch.failed": "failed",
    "batch.cancelled": "cancelled",
    "batch.canceled": "cancelled",
    "batch.partial_succeeded": "partial_succeeded",
}


def normalise_status(value: str) -> str:
    """One spelling per status (``cancelled``); raises ValueError for an unknown word."""
    word = value.strip().lower()
    word = _STATUS_ALIASES.get(word, word)
    if word not in STATUSES:
        raise ValueError(f"unknown status {value!r}; expected one of {', '.join(STATUSES)}")
    return word


def precedence(status: str | None) -> int:
    """The progress rank of a (normalised) status; unknown or missing ranks lowest."""
    if status is None:
        return NO_STATUS_RANK
    return PRECEDENCE.get(status, NO_STATUS_RANK)


def is_terminal(status: str | None) -> bool:
    return precedence(status) == TERMINAL_RANK


class DeliveryOutcome(StrEnum):
    """What became of a kept delivery (``deliveries.outcome``)."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class SignatureVerdict(StrEnum):
    """What the signature check said (``deliveries.signature``)."""

    VALID = "valid"
    UNSIGNED = "unsigned"  # no header, and unsigned deliveries are allowed
    INVALID = "invalid"
    UNCHECKED = "unchecked"  # refused before the body was read (too large)
    NOT_APPLICABLE = "not_applicable"  # fetched from Runflow's API, not posted to us


class DeliverySource(StrEnum):
    """Where a kept delivery came from (``deliveries.source``)."""

    WEBHOOK = "webhook"
    ENRICHMENT = "enrichment"
    BACKFILL = "backfill"
    RECONCILIATION = "reconciliation"
