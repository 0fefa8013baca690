"""Protection in fewer round trips: permit + pause read pipelined, releases batched."""

from __future__ import annotations

import logging
import time

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


class _CountingRedis(redis.Redis):
    """A client that counts its round trips to Redis: direct commands and pipelines."""

    round_trips = 0

    def execute_command(self, *args, **options):
        self.round_trips += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        send = pipe.execute

        def execute(*args, **kwargs):
            self.round_trips += 1
            return send(*args, **kwargs)

        pipe.execute = execute
        return pipe


@pytest.mark.parametrize("env", [{"MAX_CONCURRENCY": 2}, {}])
def test_the_usual_call_takes_one_round_trip_to_admit_and_one_to_release(redis_url, env):
    """Breaker, permit and pause asked together; breaker outcome and permit given back together."""
    counting = _CountingRedis.from_url(redis_url)
    try:
        p = protection(counting, **env)
        p.admit("charge").release(None)          # scripts loaded into Redis
        before = counting.round_trips
        permit = p.admit("charge")
        assert counting.round_trips - before == 1
        permit.release(None)
        assert counting.round_trips - before == 2
        assert p.breaker.state()["calls"] == 2
        if env:
            assert p.semaphore.in_use() == 0
    finally:
        counting.close()


def test_a_permit_asked_for_beside_an_open_breaker_is_given_back(client):
    """The permit is asked for in the breaker's round trip: refused by the breaker, the call
    holds nothing afterwards, and the half-open probe then finds the only permit free."""
    p = protection(client, MAX_CONCURRENCY=1, BREAKER_FAILURES=1, BREAKER_OPEN="0.2")
    p.admit("charge").release(Transient("503"))
    for _ in range(3):
        with pytest.raises(Deferred) as info:
            p.admit("charge")
        assert info.value.code == "breaker_open"
    assert p.semaphore.in_use() == 0
    time.sleep(0.25)
    probe = p.admit("charge")
    assert probe.probe and p.semaphore.in_use() == 1
    with pytest.raises(Deferred) as info:
        p.admit("charge")                       # every probe taken: refused, nothing kept
    assert info.value.code == "breaker_half_open"
    assert p.semaphore.in_use() == 1
    probe.release(None)
    assert p.breaker.state()["state"] == "closed" and p.semaphore.in_use() == 0


def test_a_probe_that_waits_for_a_permit_keeps_its_probe_permit(client):
    """No permit free: the call waits for one as before, holding what the breaker gave it."""
    p = protection(client, MAX_CONCURRENCY=1, BREAKER_FAILURES=1, BREAKER_OPEN="0.2",
                   MAX_WAIT="0.1")
    p.admit("charge").release(Transient("503"))
    time.sleep(0.25)
    held = p.semaphore.try_acquire()            # another worker holds the only permit
    with pytest.raises(Deferred) as info:
        p.admit("charge")
    assert info.value.code == "concurrency"
    assert p.breaker.state()["probes_in_flight"] == 0   # the probe permit was given back
    p.semaphore.release(held)
    probe = p.admit("charge")
    assert probe.probe
    probe.release(None)
    assert p.breaker.state()["state"] == "closed"
