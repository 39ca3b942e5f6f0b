"""HMAC-SHA256 signatures: Runflow's on inbound webhooks, and ours on outbound alert hooks.

Both are lowercase hex HMAC-SHA256 of the raw body, keyed by the secret.

The secret is used as its UTF-8 bytes (``whsec_...`` is not decoded). During rotation several
secrets are valid, so every configured one is tried. Comparison is constant time; anything
that is not 64 hex digits (after an optional ``sha256=`` prefix) fails closed before any
comparison, so no header value can make the check raise.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

SIGNATURE_HEADER = "Runflow-Signature"
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def sign(body: bytes, secret: str) -> str:
    """The signature of ``body`` under ``secret`` (what Runflow sends; what hooks receive)."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def signature_digest(header: str | None) -> bytes | None:
    """The 32 bytes a well-formed header names, or None for anything else."""
    if header is None:
        return None
    candidate = header.strip()
    # Some relays prefix the algorithm; accept "sha256=<hex>" as the same value.
    if candidate[:7].lower() == "sha256=":
        candidate = candidate[7:]
    if not _HEX_DIGEST.fullmatch(candidate):
        return None
    return bytes.fromhex(candidate)


def verify_signature(body: bytes, header: str | None, secrets: Sequence[str]) -> bool:
    """True when ``header`` is the signature of ``body`` under any of ``secrets``."""
    digest = signature_digest(header)
    if digest is None or not secrets:
        return False
    matched = False
    for secret in secrets:
        # No early exit: every secret costs the same, whichever one matches.
        expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).digest()
        matched |= hmac.compare_digest(expected, digest)
    return matched
