"""Make text safe to log, store in an attempt row or show in Flower.

``sanitize`` masks credentials (Authorization values, bearer tokens, Stripe keys,
``whsec_`` secrets, ``api_key=``/``token=``/``password=``/``secret=`` pairs in query
strings, headers and JSON-ish text), card numbers, and the personal data providers echo
in their error messages (e-mail addresses keep only their domain, ``***@example.com``;
Stripe-style customer ids become ``cus_***``), replaces control characters (CR/LF log
injection) with spaces, and truncates. ``SanitizingFilter`` applies it to log records.
"""

from __future__ import annotations

import logging
import re

MASK = "***"
DEFAULT_MAX_LENGTH = 500

_AUTH_HEADER = re.compile(
    r"""(?ix)
    (\b(?:proxy-)?authorization["']?\s*[:=]\s*["']?)   # header name and separator
    (?:(bearer|basic|token|digest)\s+)?                # optional scheme, kept
    [^\s"',;&]+""")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]+=*")
_PROVIDER_KEYS = re.compile(r"\b((?:sk|rk|pk)_(?:live|test)_|whsec_)[A-Za-z0-9+/=_]+")
_PAIR = re.compile(
    r"""(?ix)
    (\b[\w-]*(?:api[_-]?key|apikey|token|passw(?:or)?d|secret|credential|session[_-]?id)[\w-]*
     ["']?\s*[:=]\s*)                                  # key and separator
    ("[^"]*"|'[^']*'|[^\s&,;"'}\]]+)""")
# 13-19 digits, optionally grouped by single spaces or dashes, not glued to a word.
_CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
# The local part of an address (letters and digits of any script and the WHATWG rule's
# signs, but not a quote, which more often encloses the address), "@", a dotted domain.
_EMAIL = re.compile(r"[\w.!#$%&*+/=?^`{|}~-]+@(?=[\w-]+(?:\.[\w-]+)+)")
_CUSTOMER = re.compile(r"\b(cus_)[A-Za-z0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


# Every keyword _PAIR looks for contains one of these (api_key/api-key/apikey: "key";
# passwd/password: "passw"; session_id/session-id/sessionid: "session").
_PAIR_WORDS = ("key", "token", "passw", "secret", "credential", "session")


def _might_pair(lower: str) -> bool:
    return any(word in lower for word in _PAIR_WORDS)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    # Luhn keeps millisecond timestamps and other long ids readable; real PANs always pass.
    if not _luhn_ok(digits):
        return match.group(0)
    return f"****{digits[-4:]}"


def _mask_pair(match: re.Match[str]) -> str:
    value = match.group(2)
    if value == MASK or value.endswith(MASK):
        return match.group(0)
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match.group(1)}{quote}{MASK}{quote}"


def sanitize(text: object, max_length: int | None = DEFAULT_MAX_LENGTH) -> str:
    """Return ``text`` (``str()``-ed if needed) with secrets, card numbers and personal data masked.

    Args:
        text: anything; non-strings are converted with ``str``.
        max_length: truncate the result to this many characters (ending in ``…``);
            None keeps the full length.

    Returns:
        A single line: CR, LF and other control characters become spaces.
    """
    s = text if isinstance(text, str) else str(text)
    s = _CONTROL.sub(" ", s)
    # Each pattern below can only match text holding its literal words, so for ASCII text
    # (where lower() folds case exactly as the patterns' IGNORECASE does) a pattern whose
    # words are absent is skipped: it could not change anything. _PAIR's backtracking
    # over every word is most of the cost of a typical log line.
    ascii_ = s.isascii()
    if not ascii_ or "authorization" in s.lower():
        s = _AUTH_HEADER.sub(
            lambda m: f"{m.group(1)}{m.group(2) + ' ' if m.group(2) else ''}{MASK}", s)
    if not ascii_ or "bearer" in s.lower():
        s = _BEARER.sub(rf"\1 {MASK}", s)
    if not ascii_ or "_live_" in s or "_test_" in s or "whsec_" in s:
        s = _PROVIDER_KEYS.sub(rf"\1{MASK}", s)
    if not ascii_ or (("=" in s or ":" in s) and _might_pair(s.lower())):
        s = _PAIR.sub(_mask_pair, s)
    s = _CARD.sub(_mask_card, s)
    if "@" in s:
        s = _EMAIL.sub(f"{MASK}@", s)
    if "cus_" in s:
        s = _CUSTOMER.sub(rf"\1{MASK}", s)
    if max_length is not None and len(s) > max_length:
        s = s[: max(max_length - 1, 0)] + "…"
    return s


class SanitizingFilter(logging.Filter):
    """Logging filter that renders each record's message and replaces it by its sanitised form.

    Install it on handlers (``handler.addFilter(SanitizingFilter())``) so every record,
    whoever logged it, is cleaned before formatting. Exception tracebacks are sanitised
    line by line and kept multi-line.
    """

    def __init__(self, max_length: int | None = DEFAULT_MAX_LENGTH):
        """Args: max_length: passed to ``sanitize`` for the message (not the traceback)."""
        super().__init__()
        self.max_length = max_length

    def filter(self, record: logging.LogRecord) -> bool:
        """Sanitise ``record`` in place; always returns True (never drops a record)."""
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the record
            message = f"{record.msg!r} {record.args!r}"
        record.msg = sanitize(message, self.max_length)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = "\n".join(sanitize(line, None) for line in record.exc_text.splitlines())
        return True
