"""Payload intake: is this plain, bounded JSON data? And its canonical text.

``enqueue`` runs ``canonical_json`` before the payload's JSON Schema is consulted, so
that the schema only ever sees data it can check in bounded time, and so that no odd
input reaches ``json.dumps`` or the database as a raw exception. One walk over the
value, without recursion, refuses (naming the JSON path, never the value):

* anything but objects with string keys, arrays (lists), strings, integers, finite
  floats, booleans and null — tuples, sets, bytes, dates and ``Decimal`` included;
* nesting deeper than ``MAX_DEPTH``;
* integers outside the signed 64-bit range (JSON readers disagree beyond it, and
  Python refuses to print integers over 4,300 digits);
* floats with no fraction (``19.0``): JSON Schema counts them as integers, but a
  provider receiving ``amount=19.0`` refuses it; write ``19``;
* NaN and infinities (not JSON);
* strings and keys holding NUL (PostgreSQL cannot store it) or unpaired surrogates
  (not Unicode: they cannot be encoded);
* a payload whose serialized size exceeds the cap (``OUTBOX_MAX_PAYLOAD_BYTES``,
  default 256 KiB). The walk keeps a lower bound of the size and stops as soon as it
  passes the cap, so a 100 MB string is refused without being copied; the exact size
  of the canonical text is then checked.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import InvalidPayload

MAX_DEPTH = 32
MAX_INT = 2**63 - 1


def canonical_json(payload: Any, *, max_bytes: int, label: str = "payload") -> str:
    """Check ``payload`` (see the module docstring) and return its canonical JSON text:
    sorted keys, no spaces, UTF-8 characters as they are.

    Args:
        payload: the operation payload; must be a dict.
        max_bytes: cap on the UTF-8 size of the canonical text
            (``outbox.config.max_payload_bytes()``).
        label: names the payload in errors (``payments.charge``).

    Raises:
        InvalidPayload: with ``path`` set to the offending value's JSON path.
    """
    if not isinstance(payload, dict):
        raise InvalidPayload(f"invalid payload for {label}: $: must be a JSON object", "$")
    _walk(payload, max_bytes, label)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidPayload(f"invalid payload for {label}: $: {size} bytes serialized, more "
                             f"than the {max_bytes}-byte cap (OUTBOX_MAX_PAYLOAD_BYTES)", "$")
    return text


def _walk(payload: dict, max_bytes: int, label: str) -> None:
    budget = max_bytes   # a lower bound of the serialized size still allowed

    def refuse(path: str, reason: str) -> InvalidPayload:
        return InvalidPayload(f"invalid payload for {label}: {path}: {reason}", path)

    stack: list[tuple[Any, str, int]] = [(payload, "$", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            budget -= len(value) + 2
            _check_text(value, path, refuse)
        elif isinstance(value, bool) or value is None:
            budget -= 4
        elif isinstance(value, int):
            if not -MAX_INT <= value <= MAX_INT:
                raise refuse(path, "integer out of range (at most 19 digits, signed 64-bit)")
            budget -= 1
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise refuse(path, "NaN and infinity are not JSON numbers")
            if value.is_integer():
                raise refuse(path, "a float with no fraction; send an integer (no decimal point)")
            budget -= 3
        elif isinstance(value, dict):
            if depth >= MAX_DEPTH:
                raise refuse(path, f"nested deeper than {MAX_DEPTH} levels")
            budget -= 2
            for key, item in value.items():
                if not isinstance(key, str):
                    raise refuse(path, "object keys must be strings")
                child = _child(path, key)
                _check_text(key, child, refuse)
                budget -= len(key) + 3
                stack.append((item, child, depth + 1))
        elif isinstance(value, list):
            if depth >= MAX_DEPTH:
                raise refuse(path, f"nested deeper than {MAX_DEPTH} levels")
            budget -= 2 + len(value)
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        else:
            raise refuse(path, f"{type(value).__name__} is not JSON data (use objects, arrays, "
                               "strings, numbers, booleans or null)")
        if budget < 0:
            raise refuse("$", f"larger than the {max_bytes}-byte cap (OUTBOX_MAX_PAYLOAD_BYTES)")


def _check_text(text: str, path: str, refuse) -> None:
    if "\x00" in text:
        raise refuse(path, "NUL characters are not allowed")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise refuse(path, "not valid Unicode (an unpaired surrogate)") from None


def _child(path: str, key: str) -> str:
    """``$.metadata.order``; a key that is not a plain name is quoted and shortened, so a
    path never carries control characters or much of a key into a message."""
    if key.isascii() and key.replace("_", "a").replace("-", "a").isalnum() and len(key) <= 64:
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key[:40])}]"
