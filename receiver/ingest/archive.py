"""What the archive keeps about a request: the entry, the request as read, the kept headers.

Plain data, no I/O: ``receiver.ingest.store`` writes entries, ``receiver.ingest.pipeline``
makes them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

from receiver.vocabulary import DeliverySource, SignatureVerdict

KEPT_HEADERS = (
    "content-type",
    "content-length",
    "user-agent",
    "runflow-request-id",
    "runflow-signature",
    "x-forwarded-for",
)


@dataclass
class RawDelivery:
    """A request as the route read it (body already capped)."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


@dataclass
class ArchiveEntry:
    """What the archive keeps about a request, whatever its outcome. Build with :meth:`of`."""

    received_at: datetime
    signature: str
    source: str = DeliverySource.WEBHOOK
    request_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    body: bytes | None = None
    body_sha256: bytes | None = None
    body_size: int | None = None

    @classmethod
    def of(
        cls,
        body: bytes | None,
        *,
        signature: SignatureVerdict,
        source: DeliverySource = DeliverySource.WEBHOOK,
        received_at: datetime | None = None,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
        content_type: str | None = "application/json",
    ) -> ArchiveEntry:
        """The one way to describe a delivery: its hash and size come from ``body``."""
        return cls(
            received_at=received_at or datetime.now(UTC),
            signature=signature,
            source=source,
            request_id=request_id,
            headers=headers or {},
            content_type=content_type,
            body=body,
            body_sha256=None if body is None else hashlib.sha256(body).digest(),
            body_size=None if body is None else len(body),
        )


def kept_headers(headers: dict[str, str]) -> dict[str, str]:
    return {name: headers[name] for name in KEPT_HEADERS if name in headers}


def archive_entry(
    raw: RawDelivery, signature: SignatureVerdict, *, keep_body: bool
) -> ArchiveEntry:
    entry = ArchiveEntry.of(
        raw.body,
        signature=signature,
        received_at=raw.received_at,
        request_id=raw.headers.get("runflow-request-id"),
        headers=kept_headers(raw.headers),
        content_type=raw.content_type,
    )
    if not keep_body:
        entry.body = None
    return entry
