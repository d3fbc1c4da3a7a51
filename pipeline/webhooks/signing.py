"""Webhook signatures, for Greetflow and for receivers.

This module imports nothing but the standard library: a receiver may copy it (or
`from pipeline.webhooks.signing import verify_signature`) without installing Greetflow.

Header: ``Greetflow-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>]``, where each ``v1``
is HMAC-SHA256 under one endpoint secret of ``f"{t}.".encode() + body``. During a
secret rotation's grace period two ``v1`` values are sent (new secret first, then the
previous one); a receiver accepts the request when any of them matches its secret.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

HEADER = "Greetflow-Signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<body>"`` under ``secret``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secrets: Sequence[str], body: bytes, *, timestamp: int | None = None) -> str:
    """The header value signing ``body`` with every secret in ``secrets`` (at least one)."""
    if not secrets:
        raise ValueError("at least one secret is needed to sign")
    t = int(time.time()) if timestamp is None else timestamp
    return ",".join([f"t={t}", *(f"v1={sign(s, t, body)}" for s in secrets)])


def verify_signature(
    secret: str, header: str, body: bytes, tolerance_s: float = 300, *, now: float | None = None
) -> bool:
    """True when ``header`` (a ``Greetflow-Signature`` value) carries a ``v1`` signature of
    ``body`` under ``secret`` and its timestamp is within ``tolerance_s`` of now. ``body``
    must be the raw request bytes, before any JSON parsing."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            if timestamp is not None or not value.isdigit():
                return False
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value.strip().lower())
    if timestamp is None or not candidates or not secret:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, c) for c in candidates)
