"""What the archive keeps about a request: the entry, the request as read, the kept headers.

Plain data, no I/O: ``receiver.ingest.store`` writes entries, ``receiver.ingest.pipeline``
makes them.
"""

from __future__ import annotations

import hashlib
import zlib
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
    _stored: tuple[bytes | None, str | None] | None = field(default=None, repr=False, compare=False)

    def stored_body(self) -> tuple[bytes | None, str | None]:
        """The body as the archive keeps it, and its encoding (:func:`encode_body`): worked
        out once, however often a batch holding this entry is written or retried."""
        if self._stored is None:
            self._stored = encode_body(self.body)
        return self._stored

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


# The archive keeps a body compressed when that makes it smaller (``deliveries.body_encoding``,
# revision 0012): PostgreSQL compresses a value only once its row passes about 2 KB, so most
# deliveries were kept as they came. zlib's own format (RFC 1950), level 6: on the bench's mix
# the body column takes 47 % of the bytes received, against 76 % before (bench/README.md).
# Decompressed, the bytes are exactly those received, so their hash and signature still check;
# ``decode_body`` is the way back.
BODY_ZLIB = "zlib"
_COMPRESS_FROM = 64  # below this many bytes zlib's header and checksum outweigh any saving


def encode_body(body: bytes | None) -> tuple[bytes | None, str | None]:
    """What the archive stores for ``body`` and its ``body_encoding`` (None: as received)."""
    if body is None or len(body) < _COMPRESS_FROM:
        return body, None
    packed = zlib.compress(body, 6)
    if len(packed) >= len(body):
        return body, None
    return packed, BODY_ZLIB


def decode_body(stored: bytes, encoding: str | None) -> bytes:
    """The bytes as received, from what the archive stores (see :func:`encode_body`)."""
    if encoding is None:
        return stored
    if encoding == BODY_ZLIB:
        return zlib.decompress(stored)
    raise ValueError(f"unknown body encoding {encoding!r}")


# Each kept value is cut to this many characters: a header is evidence, not storage.
MAX_HEADER_VALUE = 1024
MAX_REQUEST_ID = 255


def clipped(value: str | None, limit: int) -> str | None:
    """``value`` cut to ``limit`` characters, marked with an ellipsis when it was cut."""
    if value is None or len(value) <= limit:
        return value
    return value[: limit - 1] + "\u2026"


def kept_headers(headers: dict[str, str]) -> dict[str, str]:
    """The headers the archive keeps, each value at most :data:`MAX_HEADER_VALUE` characters."""
    return {
        name: clipped(headers[name], MAX_HEADER_VALUE) or ""
        for name in KEPT_HEADERS
        if name in headers
    }


# Headers a webhook row already keeps in a column of its own, value for value: the archive's
# ``headers`` leaves them out (about 100 bytes a row with a request id, near a third of what a
# typical row holds besides its body) and reads put them back (``receiver.queries``).
_IN_COLUMNS = (("content-type", "content_type"), ("runflow-request-id", "request_id"))


def stored_headers(entry: ArchiveEntry) -> dict[str, str]:
    """``entry.headers`` as the archive row stores them: without the values its columns hold.

    Only a webhook row's columns come from its headers (a fetched run's content type is not a
    header it had). A request id cut shorter in its column than in the headers stays.
    """
    if entry.source != DeliverySource.WEBHOOK:
        return entry.headers
    same = {
        name
        for name, column in _IN_COLUMNS
        if name in entry.headers and entry.headers[name] == getattr(entry, column)
    }
    if not same:
        return entry.headers
    return {name: value for name, value in entry.headers.items() if name not in same}


def archive_entry(
    raw: RawDelivery, signature: SignatureVerdict, *, keep_body: bool
) -> ArchiveEntry:
    entry = ArchiveEntry.of(
        raw.body,
        signature=signature,
        received_at=raw.received_at,
        request_id=clipped(raw.headers.get("runflow-request-id"), MAX_REQUEST_ID),
        headers=kept_headers(raw.headers),
        content_type=clipped(raw.content_type, MAX_HEADER_VALUE),
    )
    if not keep_body:
        entry.body = None
    return entry
