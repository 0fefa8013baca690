"""Message ids: ULIDs (26 Crockford base32 characters, sortable by creation time)."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(now_s: float | None = None) -> str:
    """Return a new ULID: 48 bits of milliseconds since the epoch then 80 random bits."""
    millis = int((time.time() if now_s is None else now_s) * 1000)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))
