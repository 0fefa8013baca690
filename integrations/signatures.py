"""Verifying inbound webhooks: Stripe's scheme (``payments``) and Standard Webhooks (every
other provider), in constant time, with a timestamp tolerance against replays.

Both are HMAC-SHA256 over the timestamp and the raw body (and, for Standard Webhooks, the
message id), so the body must be verified exactly as it arrived, before any parsing.
Several secrets may be configured at once (rotation): any of them verifies. Every
refusal is a ``SignatureError`` whose text says what was wrong without echoing secrets or
signatures.

- Stripe: ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]``, HMAC of ``"<t>.<body>"``
  keyed with the whole ``whsec_…`` secret; any ``v1`` may match.
- Standard Webhooks: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature:
  v1,<base64> [v1,<base64>…]``, HMAC of ``"<id>.<timestamp>.<body>"`` keyed with the
  base64-decoded part of ``whsec_<base64>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TOLERANCE_S = 300
MAX_SIGNATURES = 10   # entries looked at in one header: a header of thousands is refused


class SignatureError(ValueError):
    """The request is not provably from the provider (400)."""


@dataclass(frozen=True)
class Verified:
    """What a verified request proves: its event id (None when only the body has one), its
    timestamp, and the headers the signature covered."""

    event_id: str | None
    timestamp: int
    headers: dict[str, str]


def _timestamp(raw: str | None, now: float, what: str) -> int:
    if raw is None or not raw.strip():
        raise SignatureError(f"missing {what}")
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:   # "²" is a digit to isdigit
        raise SignatureError(f"malformed {what}")
    value = int(raw)
    if abs(now - value) > TOLERANCE_S:
        raise SignatureError(f"{what} outside the {TOLERANCE_S} s tolerance")
    return value


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def verify_stripe(body: bytes, header: str | None, secrets: Sequence[str],
                  now: float | None = None) -> Verified:
    """Verify ``Stripe-Signature``. Raises SignatureError."""
    if not header:
        raise SignatureError("missing Stripe-Signature header")
    timestamp, signatures = None, []
    for item in header.split(",")[:MAX_SIGNATURES * 2]:
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("malformed Stripe-Signature header")
        if key == "t":
            timestamp = value
        elif key == "v1":
            try:
                signatures.append(bytes.fromhex(value))
            except ValueError:
                raise SignatureError("malformed Stripe-Signature header") from None
    if not signatures:
        raise SignatureError("no v1 signature in Stripe-Signature")
    t = _timestamp(timestamp, time.time() if now is None else now, "Stripe-Signature timestamp")
    signed = f"{t}.".encode() + body
    if not _any_match([_hmac(s.encode(), signed) for s in secrets], signatures):
        raise SignatureError("no signature matches")
    return Verified(None, t, {"stripe-signature": header})


def _standard_key(secret: str) -> bytes:
    raw = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:   # binascii.Error, or a character outside ASCII
        raise ValueError("a Standard Webhooks secret is whsec_ followed by base64") from None


def verify_standard(body: bytes, headers: Mapping[str, str], secrets: Sequence[str],
                    now: float | None = None) -> Verified:
    """Verify Standard Webhooks headers (case-insensitive mapping). Raises SignatureError."""
    message_id = headers.get("webhook-id")
    if not message_id or len(message_id) > 255:
        raise SignatureError("missing or malformed webhook-id header")
    t = _timestamp(headers.get("webhook-timestamp"), time.time() if now is None else now,
                   "webhook-timestamp")
    header = headers.get("webhook-signature")
    if not header:
        raise SignatureError("missing webhook-signature header")
    signatures = []
    for item in header.split()[:MAX_SIGNATURES]:
        version, sep, value = item.partition(",")
        if not sep:
            raise SignatureError("malformed webhook-signature header")
        if version != "v1":
            continue
        try:
            signatures.append(base64.b64decode(value, validate=True))
        except ValueError:   # binascii.Error, or a character outside ASCII
            raise SignatureError("malformed webhook-signature header") from None
    if not signatures:
        raise SignatureError("no v1 signature in webhook-signature")
    signed = f"{message_id}.{t}.".encode() + body
    if not _any_match([_hmac(_standard_key(s), signed) for s in secrets], signatures):
        raise SignatureError("no signature matches")
    return Verified(message_id, t, {"webhook-id": message_id, "webhook-timestamp": str(t),
                                    "webhook-signature": header})


def _any_match(expected: list[bytes], given: list[bytes]) -> bool:
    """Whether any given signature equals any expected one; every pair is compared, in
    constant time, so the time taken says nothing about which came close."""
    found = False
    for e in expected:
        for g in given:
            found |= hmac.compare_digest(e, g)
    return found


def sign_stripe(body: bytes, secret: str, timestamp: int) -> str:
    """A ``Stripe-Signature`` value (the sandbox and tests send these)."""
    return f"t={timestamp},v1={_hmac(secret.encode(), f'{timestamp}.'.encode() + body).hex()}"


def sign_standard(body: bytes, secret: str, message_id: str, timestamp: int) -> str:
    """A ``webhook-signature`` value."""
    digest = _hmac(_standard_key(secret), f"{message_id}.{timestamp}.".encode() + body)
    return f"v1,{base64.b64encode(digest).decode()}"
