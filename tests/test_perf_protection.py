"""Protection in fewer round trips: permit + pause read pipelined, releases batched."""

from __future__ import annotations

import logging

import pytest
import redis

from integrations.errors import Deferred, Transient
from integrations.protection import Protection
from tests.protection_helpers import new_name
from tests.protection_helpers import protection as named_protection


def protection(client, **env) -> Protection:
    """Protection under a fresh provider name."""
    return named_protection(client, new_name(), **env)


def test_success_and_failure_are_counted_and_permits_returned(client):
    p = protection(client, MAX_CONCURRENCY=2, BREAKER_FAILURES=100)
    p.admit("charge").release(None)
    p.admit("charge").release(Transient("503"))
    state = p.breaker.state()
    assert (state["calls"], state["failures"]) == (2, 1)
    assert p.semaphore.in_use() == 0


def test_scripts_flushed_from_redis_are_loaded_again(client):
    p = protection(client, MAX_CONCURRENCY=2, BREAKER_FAILURES=100)
    client.script_flush()
    permit = p.admit("charge")
    assert p.semaphore.in_use() == 1
    client.script_flush()
    permit.release(Transient("503"))
    assert p.semaphore.in_use() == 0 and p.breaker.state()["failures"] == 1


def test_a_pause_is_seen_with_the_permit_and_the_permit_is_returned(client):
    p = protection(client, MAX_CONCURRENCY=1, MAX_WAIT="0.1")
    p.pause(5)
    with pytest.raises(Deferred) as info:
        p.admit("charge")
    assert info.value.code == "paused"
    assert p.semaphore.in_use() == 0


def test_a_full_cap_still_waits_then_defers(client):
    p = protection(client, MAX_CONCURRENCY=1, MAX_WAIT="0.1")
    held = p.admit("charge")
    with pytest.raises(Deferred) as info:
        p.admit("charge")
    assert info.value.code == "concurrency"
    held.release(None)
    p.admit("charge").release(None)
    assert p.semaphore.in_use() == 0


def test_with_a_rate_limit_the_slot_is_reserved_after_the_permit(client):
    p = protection(client, MAX_CONCURRENCY=1, RATE_LIMIT="1/s", MAX_WAIT="0.1")
    p.admit("charge").release(None)
    held = p.admit  # the next slot is ~1 s away: deferred, and nothing held
    with pytest.raises(Deferred) as info:
        held("charge")
    assert info.value.code == "rate_limited"
    assert p.semaphore.in_use() == 0


def test_release_errors_are_logged_per_guard_and_swallowed(client, caplog):
    p = protection(client, MAX_CONCURRENCY=1)
    permit = p.admit("charge")
    broken = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=None)
    p.client = broken
    caplog.set_level(logging.WARNING, logger="integrations.protection")
    permit.release(Transient("503"))
    names = sorted(r.getMessage().split("release ")[1].split(" ")[0] for r in caplog.records
                   if "could not release" in r.getMessage())
    assert names == ["breaker", "concurrency"]
