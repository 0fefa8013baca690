"""Global concurrency cap (lease-based semaphore) against real Redis."""

from __future__ import annotations

import threading
import time

import pytest

from integrations.errors import Deferred
from integrations.protection import Semaphore
from integrations.protection.store import Keys
from tests.protection_helpers import new_name, protection


def test_cap_is_never_exceeded_by_eight_workers(client):
    """8 workers (separate Protection objects) × 10 calls of 15 ms under a cap of 3: never more
    than 3 in flight, and the cap is reached (the permits are used, not wasted)."""
    name = new_name()
    workers = [protection(client, name, MAX_CONCURRENCY=3, MAX_WAIT=10) for _ in range(8)]
    in_flight, peak, done = 0, 0, 0
    lock = threading.Lock()

    def work(p):
        nonlocal in_flight, peak, done
        for _ in range(10):
            with p.admit("charge"):
                with lock:
                    in_flight += 1
                    peak = max(peak, in_flight)
                time.sleep(0.015)
                with lock:
                    in_flight -= 1
                    done += 1

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done == 80 and peak == 3
    assert workers[0].snapshot()["permits_in_use"] == 0


def test_no_permit_within_max_wait_defers(client):
    name = new_name()
    holder = protection(client, name, MAX_CONCURRENCY=1)
    waiter = protection(client, name, MAX_CONCURRENCY=1, MAX_WAIT="0.1")
    permit = holder.admit("charge")
    started = time.monotonic()
    with pytest.raises(Deferred) as info:
        waiter.admit("charge")
    assert info.value.code == "concurrency" and info.value.retry_after_s == 1.0
    assert 0.09 <= time.monotonic() - started < 0.5   # polled up to max wait, then gave up
    assert holder.snapshot()["permits_in_use"] == 1
    permit.release(None)
    waiter.admit("charge").release(None)


def test_a_killed_workers_permit_returns_after_its_lease(client):
    """A permit never released (its worker was SIGKILLed) is free again once the lease ends."""
    sem = Semaphore(client, Keys(new_name()), limit=1, lease_s=0.3)
    assert sem.try_acquire() is not None          # the worker dies holding it
    assert sem.try_acquire() is None
    assert sem.in_use() == 1
    time.sleep(0.35)
    assert sem.in_use() == 0
    assert sem.try_acquire() is not None


def test_release_is_idempotent_and_releasing_an_expired_permit_is_harmless(client):
    sem = Semaphore(client, Keys(new_name()), limit=2, lease_s=0.1)
    token = sem.try_acquire()
    time.sleep(0.15)
    other = sem.try_acquire()
    sem.release(token)
    sem.release(token)
    assert sem.in_use() == 1 and other is not None


def test_permit_lease_comes_from_the_setting(client):
    p = protection(client, new_name(), MAX_CONCURRENCY=2, CONCURRENCY_LEASE="0.2")
    p.admit("charge")                              # never released
    assert p.snapshot()["permits_in_use"] == 1
    time.sleep(0.25)
    assert p.snapshot()["permits_in_use"] == 0


def test_no_cap_unless_configured(client):
    p = protection(client, new_name())
    permits = [p.admit("charge") for _ in range(20)]
    assert p.semaphore is None and p.snapshot()["permits_in_use"] is None
    for permit in permits:
        permit.release(None)
