"""Daily quotas (midnight UTC) against real Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from integrations.errors import Deferred
from tests.protection_helpers import new_name, protection


def seconds_to_utc_midnight() -> float:
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    return (midnight - now).total_seconds()


def test_exhausted_quota_defers_until_midnight_utc_without_leaking(client):
    """Quota 3: three calls pass; then every call is deferred until midnight UTC, and the
    refused calls do not count (used stays 3)."""
    p = protection(client, new_name(), DAILY_QUOTA=3)
    for _ in range(3):
        p.admit("charge").release(None)
    for _ in range(5):
        with pytest.raises(Deferred) as info:
            p.admit("charge")
        assert info.value.code == "quota_exhausted"
        assert info.value.retry_after_s == pytest.approx(seconds_to_utc_midnight(), abs=2)
    snap = p.snapshot()
    assert (snap["daily_quota"], snap["quota_used"], snap["quota_remaining"]) == (3, 3, 0)
    assert snap["quota_resets_in_s"] == pytest.approx(seconds_to_utc_midnight(), abs=2)
    assert p.quota.remaining() == 0


def test_counter_is_keyed_by_the_utc_date_and_expires(client):
    name = new_name()
    p = protection(client, name, DAILY_QUOTA=10)
    p.admit("charge").release(None)
    usage = p.quota.usage()
    today = datetime.now(UTC).date().isoformat()
    assert usage.key in (f"outbox:{name}:quota:{today}",
                         f"outbox:{name}:quota:{(datetime.now(UTC) - timedelta(seconds=5)).date()}")
    assert usage.used == 1 and usage.remaining == 9
    ttl = client.ttl(usage.key)
    assert 0 < ttl <= seconds_to_utc_midnight() + 3600 + 2


def test_quota_is_refunded_when_a_later_guard_defers(client):
    """Quota 5, rate 1/min with no waiting: the second call is deferred by the rate limit and
    gives its quota back (no call was made)."""
    p = protection(client, new_name(), DAILY_QUOTA=5, RATE_LIMIT="1/m", MAX_WAIT=0)
    p.admit("charge").release(None)
    with pytest.raises(Deferred, match="rate limit"):
        p.admit("charge")
    assert p.quota.usage().used == 1


def test_quota_is_shared_by_every_worker(client):
    name = new_name()
    a, b = protection(client, name, DAILY_QUOTA=2), protection(client, name, DAILY_QUOTA=2)
    a.admit("charge").release(None)
    b.admit("charge").release(None)
    with pytest.raises(Deferred):
        a.admit("charge")
    assert b.quota.remaining() == 0


def test_failed_calls_still_use_quota(client):
    """A call that reached the provider used its quota, whatever the answer."""
    from integrations.errors import Transient

    p = protection(client, new_name(), DAILY_QUOTA=5)
    p.admit("charge").release(Transient("503"))
    assert p.quota.usage().used == 1
