"""API-key checking for the payments API, with Stripe-style key masking."""

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


def check_auth(header: str, state: SandboxState) -> Result | None:
    """Return a 401 result unless ``header`` carries the configured key (Bearer or Basic)."""
    scheme, _, cred = header.partition(" ")
    given = None
    if scheme.lower() == "bearer":
        given = cred.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(cred.strip(), validate=True).decode().split(":", 1)[0]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    if not given:
        return payments.error(401, "invalid_request_error", (
            "You did not provide an API key. You need to provide your API key in the "
            "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
            "YOUR_SECRET_KEY')."))
    with state.lock:
        expected = state.api_key
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return payments.error(401, "invalid_request_error",
                              f"Invalid API Key provided: {mask_key(given)}")
    return None
