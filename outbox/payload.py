"""Payload intake: is this plain, bounded JSON data? And its canonical text.

``enqueue`` runs ``canonical_json`` before the payload's JSON Schema is consulted, so
that the schema only ever sees data it can check in bounded time, and so that no odd
input reaches ``json.dumps`` or the database as a raw exception. One walk over the
value, without recursion, refuses (naming the JSON path, never the value):

* anything but objects with string keys, arrays (lists), strings, integers, finite
  floats, booleans and null — tuples, sets, bytes, dates and ``Decimal`` included;
* nesting deeper than ``MAX_DEPTH`` (32), or more than ``MAX_VALUES`` (10,000) values
  in all — what keeps the walk, and every check after it, well inside 50 ms for any
  payload (``make bench``: ``bench.validation``);
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

import schemas

from .errors import InvalidPayload

MAX_DEPTH = 32
MAX_VALUES = 10_000
MAX_INT = 2**63 - 1
_INT_RANGE = "integer out of range (at most 19 digits, signed 64-bit)"


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
    """Visit every container once, without recursion; scalars are checked in place (the
    common case, kept inline: this loop runs once per value of a payload up to the cap).
    Paths are tuples, turned into text only for an error."""
    budget = max_bytes   # a lower bound of the serialized size still allowed
    values = MAX_VALUES  # values still allowed

    def refuse(path: tuple, reason: str) -> InvalidPayload:
        where = schemas.json_path(path)
        return InvalidPayload(f"invalid payload for {label}: {where}: {reason}", where)

    too_big = f"larger than the {max_bytes}-byte cap (OUTBOX_MAX_PAYLOAD_BYTES)"
    stack: list[tuple[dict | list, tuple, int]] = [(payload, (), 0)]
    while stack:
        container, path, depth = stack.pop()
        if depth >= MAX_DEPTH:
            raise refuse(path, f"nested deeper than {MAX_DEPTH} levels")
        is_dict = isinstance(container, dict)
        budget -= 2 if is_dict else 2 + len(container)
        values -= len(container)
        if values < 0:
            raise refuse(path, f"more than {MAX_VALUES:,} values in the payload")
        for key, item in (container.items() if is_dict else enumerate(container)):
            if is_dict:
                if not isinstance(key, str):
                    raise refuse(path, "object keys must be strings")
                budget -= len(key) + 3
                if budget < 0:
                    raise refuse((), too_big)
                _check_text(key, path + (key,), refuse)
            kind = type(item)
            if kind is str:
                budget -= len(item) + 2
                if budget < 0:
                    raise refuse((), too_big)
                _check_text(item, path + (key,), refuse)
            elif kind is int:
                budget -= 1
                if not -MAX_INT <= item <= MAX_INT:
                    raise refuse(path + (key,), _INT_RANGE)
            elif kind is dict or kind is list:
                stack.append((item, path + (key,), depth + 1))
            else:
                budget -= _other(item, path + (key,), depth + 1, stack, refuse)
        if budget < 0:
            raise refuse((), too_big)


def _other(value, path: tuple, depth: int, stack: list, refuse) -> int:
    """The less common values (and subclasses of the common ones); returns their size."""
    if isinstance(value, bool) or value is None:
        return 4
    if isinstance(value, str):
        _check_text(value, path, refuse)
        return len(value) + 2
    if isinstance(value, int):
        if not -MAX_INT <= value <= MAX_INT:
            raise refuse(path, _INT_RANGE)
        return 1
    if isinstance(value, float):
        if not math.isfinite(value):
            raise refuse(path, "NaN and infinity are not JSON numbers")
        if value.is_integer():
            raise refuse(path, "a float with no fraction; send an integer (no decimal point)")
        return 3
    if isinstance(value, dict | list):
        stack.append((value, path, depth))
        return 0
    raise refuse(path, f"{type(value).__name__} is not JSON data (use objects, arrays, "
                       "strings, numbers, booleans or null)")


def _check_text(text: str, path: tuple, refuse) -> None:
    if "\x00" in text:
        raise refuse(path, "NUL characters are not allowed")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise refuse(path, "not valid Unicode (an unpaired surrogate)") from None
