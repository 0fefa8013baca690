"""``Provider.deliver`` under protection, with MockTransport and real Redis."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from integrations import registry
from integrations.errors import ConfigurationError, Deferred, RateLimited, Transient
from integrations.protection import Protection, ProtectionSettings
from integrations.registry import build_provider
from integrations.testing import MockTransport

CHARGE = {"amount": 2000, "currency": "usd"}
INTENT = {"id": "pi_1", "object": "payment_intent", "status": "succeeded", "amount": 2000}
ENV = {"OUTBOX_PAYMENTS_API_KEY": "sk_test_key123"}


def provider(client, handler, namespace, **env):
    """A payments provider whose protection state lives under ``namespace`` in Redis."""
    environ = {**ENV, **{f"OUTBOX_PAYMENTS_{k}": str(v) for k, v in env.items()}}
    settings = ProtectionSettings.from_env("payments", environ, operations={"charge", "refund"})
    transport = MockTransport(handler)
    protection = Protection(settings, client, namespace=namespace)
    return build_provider("payments", environ, transport=transport,
                          protection=protection), transport


def ok(_request):
    return 200, {}, INTENT


def test_a_429_pauses_a_second_provider_instance(client):
    """Worker 1 gets a 429 with Retry-After: 1; worker 2 (its own Provider, same Redis) makes
    no call until the second is over: it defers with a short max wait, waits with a longer one."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    first, _ = provider(client, lambda r: (429, {"Retry-After": "1"}, {"error": {}}), ns)
    second, transport = provider(client, ok, ns, MAX_WAIT="0.3")
    patient, patient_transport = provider(client, ok, ns, MAX_WAIT="2")
    with pytest.raises(RateLimited):
        first.deliver("charge", CHARGE, "k-1")
    with pytest.raises(Deferred) as info:
        second.deliver("charge", CHARGE, "k-2")
    assert info.value.code == "paused" and 0.8 < info.value.retry_after_s <= 1.0
    assert transport.calls == []
    started = time.monotonic()
    assert patient.deliver("charge", CHARGE, "k-3").provider_ref == "pi_1"
    assert time.monotonic() - started >= 0.7 and len(patient_transport.calls) == 1


def test_a_429_without_retry_after_pauses_for_a_second(client):
    ns = f"t{uuid.uuid4().hex[:8]}"
    first, _ = provider(client, lambda r: (429, {}, {"error": {}}), ns)
    with pytest.raises(RateLimited):
        first.deliver("charge", CHARGE, "k-1")
    assert first.protection.snapshot()["paused_for_s"] == pytest.approx(1.0, abs=0.05)


def test_rate_limit_headers_on_a_success_pause_everyone(client):
    ns = f"t{uuid.uuid4().hex[:8]}"
    first, _ = provider(client, lambda r: (200, {"X-RateLimit-Remaining": "0",
                                                 "X-RateLimit-Reset": "3"}, INTENT), ns)
    second, transport = provider(client, ok, ns, MAX_WAIT=0)
    assert first.deliver("charge", CHARGE, "k-1").provider_ref == "pi_1"
    with pytest.raises(Deferred, match="paused"):
        second.deliver("charge", CHARGE, "k-2")
    assert transport.calls == []


def test_breaker_opens_on_503s_and_then_no_call_is_made(client):
    ns = f"t{uuid.uuid4().hex[:8]}"
    p, transport = provider(client, lambda r: (503, {}, {"error": {}}), ns, BREAKER_FAILURES=3)
    for n in range(3):
        with pytest.raises(Transient):
            p.deliver("charge", CHARGE, f"k-{n}")
    with pytest.raises(Deferred, match="breaker open"):
        p.deliver("charge", CHARGE, "k-4")
    assert len(transport.calls) == 3


def test_permits_are_released_whatever_the_outcome(client):
    ns = f"t{uuid.uuid4().hex[:8]}"
    answers = iter([(503, {}, {}), (402, {}, {"error": {"type": "card_error",
                                                        "code": "card_declined"}}),
                    (200, {}, INTENT)])
    p, _ = provider(client, lambda r: next(answers), ns, MAX_CONCURRENCY=1, MAX_WAIT=0)
    for n in range(3):
        try:
            p.deliver("charge", CHARGE, f"k-{n}")
        except Exception:
            pass
    assert p.protection.snapshot()["permits_in_use"] == 0


def test_invalid_payload_uses_no_quota(client):
    ns = f"t{uuid.uuid4().hex[:8]}"
    p, transport = provider(client, ok, ns, DAILY_QUOTA=1)
    with pytest.raises(Exception, match="invalid"):
        p.deliver("charge", {"amount": -1}, "k-1")
    assert p.deliver("charge", CHARGE, "k-2").provider_ref == "pi_1"
    assert len(transport.calls) == 1


def test_concurrency_cap_through_deliver(client):
    """Cap 2, 6 threads, slow provider: never more than 2 calls inside the transport."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    in_flight, peak = 0, 0
    lock = threading.Lock()

    def slow(_request):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.03)
        with lock:
            in_flight -= 1
        return 200, {}, INTENT

    providers = [provider(client, slow, ns, MAX_CONCURRENCY=2, MAX_WAIT=5)[0] for _ in range(6)]
    threads = [threading.Thread(target=lambda p=p: [p.deliver("charge", CHARGE, f"k{i}")
                                                    for i in range(4)]) for p in providers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 2


def test_redis_down_defers_and_never_calls_unprotected():
    """Protection state unreachable → Deferred with a short retry; the provider is not called."""
    transport = MockTransport(ok)
    p = build_provider("payments", ENV, transport=transport, redis="redis://127.0.0.1:1/0")
    with pytest.raises(Deferred) as info:
        p.deliver("charge", CHARGE, "k-1")
    assert info.value.code == "protection_unavailable" and info.value.retry_after_s == 5.0
    assert transport.calls == []
    assert "error" in p.protection.snapshot()
    assert p.protection.pause(1.0) == 0.0          # never raises after a 429 either


def test_unprotected_unless_asked():
    p = build_provider("payments", ENV, transport=MockTransport(ok))
    assert p.protection is None
    assert p.deliver("charge", CHARGE, "k-1").provider_ref == "pi_1"


def test_get_provider_is_protected_through_the_shared_client(redis_url, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("OUTBOX_PAYMENTS_RATE_LIMIT", "7/s")
    registry.reset()
    try:
        p = registry.get_provider("payments")
        assert p.protection is not None
        assert p.protection.snapshot()["rate_limit"] == "7/s"
        from integrations.protection.store import shared_redis
        assert shared_redis(redis_url) is shared_redis(redis_url)
    finally:
        registry.reset()


def test_get_provider_refuses_a_bad_spec(monkeypatch):
    monkeypatch.setenv("OUTBOX_PAYMENTS_RATE_LIMIT", "fast")
    registry.reset()
    try:
        with pytest.raises(ConfigurationError, match="OUTBOX_PAYMENTS_RATE_LIMIT.*'fast'"):
            registry.get_provider("payments")
    finally:
        registry.reset()


def test_a_failed_half_open_probe_is_marked_and_waits_for_the_breaker(client):
    """A probe's failure carries ``probe`` (outbox.decisions defers it without spending an
    attempt) and, when the provider named no wait, the breaker's open time: coming back
    sooner would only meet the open breaker again."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    down, _ = provider(client, lambda r: (503, {}, {"error": {}}), ns, BREAKER_FAILURES=1,
                       BREAKER_OPEN="0.3")
    with pytest.raises(Transient) as first:
        down.deliver("charge", CHARGE, "k-1")
    assert first.value.probe is False and first.value.retry_after_s is None
    time.sleep(0.35)                                  # half-open: the next call is the probe
    with pytest.raises(Transient) as probe:
        down.deliver("charge", CHARGE, "k-2")
    assert probe.value.probe is True and probe.value.retry_after_s == pytest.approx(0.3)
