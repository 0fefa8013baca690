"""``sanitize`` skips patterns whose words are absent: it must mask exactly as running them all."""

from __future__ import annotations

import random

import pytest

from integrations import sanitize as s


def reference(text: object, max_length: int | None = s.DEFAULT_MAX_LENGTH) -> str:
    """Every pattern, always (``sanitize`` before its pre-checks)."""
    out = text if isinstance(text, str) else str(text)
    out = s._CONTROL.sub(" ", out)
    out = s._AUTH_HEADER.sub(
        lambda m: f"{m.group(1)}{m.group(2) + ' ' if m.group(2) else ''}{s.MASK}", out)
    out = s._BEARER.sub(rf"\1 {s.MASK}", out)
    out = s._PROVIDER_KEYS.sub(rf"\1{s.MASK}", out)
    out = s._PAIR.sub(s._mask_pair, out)
    out = s._CARD.sub(s._mask_card, out)
    out = s._EMAIL.sub(f"{s.MASK}@", out)
    out = s._CUSTOMER.sub(rf"\1{s.MASK}", out)
    if max_length is not None and len(out) > max_length:
        out = out[: max(max_length - 1, 0)] + "…"
    return out


PIECES = [
    "Authorization", "PROXY-AUTHORIZATION", "authorization", ": ", "=", ":", "\"", "'", " ",
    "Bearer ", "bearer", "BEARER", "Basic ", "token ", "sk_live_", "sk_test_", "rk_live_",
    "pk_test_", "whsec_", "abcDEF123", "API_KEY", "api-key", "ApiKey", "x-api-key", "Token",
    "passwd", "PASSWORD", "pwd", "secret", "client_secret", "Credential", "session_id",
    "SessionId", "session-id", "4242424242424242", "4242 4242 4242 4242", "4000-0566-5566-5556",
    "1234567890123", "&", "?", ",", ";", "}", "]", "\r\n", "\t", "\x00", "POST /v1/x -> 200",
    "é", "İ", "ı", "ſ", "K", "ﬀ", "***", "%", "0", "12", "-", "_", "ke", "y",
]


@pytest.mark.parametrize("seed", range(40))
def test_same_result_as_running_every_pattern(seed):
    rng = random.Random(seed)
    for _ in range(500):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14)))
        limit = rng.choice([None, 500, 20])
        assert s.sanitize(text, limit) == reference(text, limit), text


@pytest.mark.parametrize("text", [
    "POST /v1/payment_intents -> 200 in 3 ms",
    "Task outbox.deliver[0b9c2c1e-6a1b-4a55-9f0e-3e2b1f1c2d3e] succeeded in 0.0061s: "
    "'payments.charge 01J8ABCDEF: 200 pi_01J8 succeeded'",
    "Authorization: Bearer sk_live_abc123 api_key=xyz card 4242 4242 4242 4242",
    "authorİzation: Bearer abc", "ſecret=abc", "toKen=abc", "pass\u212aword",
    {"api_key": "v", "n": 4242424242424242},
])
def test_known_lines(text):
    assert s.sanitize(text) == reference(text)
