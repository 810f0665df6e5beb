"""Webhook signatures: HMAC-SHA256 over `"{timestamp}.{body}"`, sent as `X-Darkroom-Signature: t=<unix>,v1=<hex>`.

Signing the timestamp with the body lets a receiver refuse replays (an old, validly signed request) by checking that
`t` is recent. Several `v1=` values may appear (one per secret while a secret is being rotated); one match is enough.
No darkroom imports here: the SDK (`darkroom.client`) uses this module on machines that run no server.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Darkroom-Signature"
TIMESTAMP_HEADER = "X-Darkroom-Timestamp"
EVENT_HEADER = "X-Darkroom-Event"
DELIVERY_HEADER = "X-Darkroom-Delivery"
DEFAULT_TOLERANCE_SECONDS = 300


class WebhookVerificationError(ValueError):
    """The request did not come from darkroom with this secret, or it is too old (a replay)."""


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for `body` sent at `timestamp` (default: now)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={_digest(secret, t, body)}"


def verify(
    body: bytes,
    header: str | None,
    secret: str,
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> int:
    """Check a delivery: `body` is the raw request body (bytes as received, before any JSON parsing), `header` the
    `X-Darkroom-Signature` value. Returns the signed timestamp; raises WebhookVerificationError otherwise."""
    if not header:
        raise WebhookVerificationError(f"no {SIGNATURE_HEADER} header")
    timestamp, candidates = _parse(header)
    current = time.time() if now is None else now
    if tolerance and abs(current - timestamp) > tolerance:
        raise WebhookVerificationError(f"timestamp {timestamp} is outside the {tolerance:g} s tolerance")
    expected = _digest(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise WebhookVerificationError("signature does not match")
    return timestamp


def _parse(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookVerificationError(f"malformed {SIGNATURE_HEADER} header")
    return timestamp, candidates
