"""HMAC-SHA256 signatures: Runflow's on inbound webhooks, and ours on outbound alert hooks.

Both are lowercase hex HMAC-SHA256 of the raw body, keyed by the secret.

The secret is used as its UTF-8 bytes (``whsec_...`` is not decoded). During rotation several
secrets are valid, so every configured one is tried. Comparison is constant time; anything
malformed fails closed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

SIGNATURE_HEADER = "Runflow-Signature"


def sign(body: bytes, secret: str) -> str:
    """The signature of ``body`` under ``secret`` (what Runflow sends; what hooks receive)."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secrets: Sequence[str]) -> bool:
    """True when ``header`` is the signature of ``body`` under any of ``secrets``."""
    if not header or not secrets:
        return False
    candidate = header.strip().lower()
    # Some relays prefix the algorithm; accept "sha256=<hex>" as the same value.
    if candidate.startswith("sha256="):
        candidate = candidate[len("sha256=") :]
    if len(candidate) != 64:
        return False
    matched = False
    for secret in secrets:
        # No early exit: every secret costs the same, whichever one matches.
        matched |= hmac.compare_digest(sign(body, secret), candidate)
    return matched
