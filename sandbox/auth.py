"""API-key checking (payments here; email in ``sandbox.mail``), with Stripe-style key masking."""

from __future__ import annotations

import base64
import binascii
import hmac

from sandbox import payments
from sandbox.payments import Result
from sandbox.state import SandboxState


def mask_key(key: str) -> str:
    """Mask an API key the way Stripe does: keep the ``sk_test_`` prefix and last 4 chars."""
    parts = key.split("_")
    prefix = "_".join(parts[:2]) + "_" if len(parts) >= 3 else ""
    rest = key[len(prefix):]
    if len(rest) >= 12:
        return prefix + "*" * (len(rest) - 4) + rest[-4:]
    return prefix + "****"


def presented_key(header: str) -> str:
    """The key an ``Authorization`` header carries (Bearer, or Basic's user name); "" if none."""
    scheme, _, cred = header.partition(" ")
    if scheme.lower() == "bearer":
        return cred.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(cred.strip(), validate=True).decode().split(":", 1)[0]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


def key_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of a presented key with the expected one."""
    return hmac.compare_digest(given.encode(), expected.encode())


def check_auth(header: str, state: SandboxState) -> Result | None:
    """Return a 401 result unless ``header`` carries the configured key (Bearer or Basic)."""
    given = presented_key(header)
    if not given:
        return payments.error(401, "invalid_request_error", (
            "You did not provide an API key. You need to provide your API key in the "
            "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
            "YOUR_SECRET_KEY')."))
    with state.lock:
        expected = state.api_key
    if not key_matches(given, expected):
        return payments.error(401, "invalid_request_error",
                              f"Invalid API Key provided: {mask_key(given)}")
    return None
