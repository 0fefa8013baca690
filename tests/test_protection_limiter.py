"""Global rate limiter (GCRA with reservation), the shared 429 pause and X-RateLimit headers,
against real Redis. Separate ``Protection`` objects stand for separate worker processes."""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from integrations.base import Response
from integrations.errors import Deferred
from integrations.protection import pause_from_headers
from integrations.protection.limiter import DEFAULT_MARGIN
from sandbox.stats import max_in_window
from tests.protection_helpers import new_name, protection


def test_reservations_from_four_workers_are_spaced_by_the_interval(client):
    """4 threads × 50 reservations at 50/s: the granted slots (Redis clock) are never closer
    than the interval plus the safety margin, and follow each other without gaps."""
    name = new_name()
    workers = [protection(client, name, RATE_LIMIT="50/s").limiter for _ in range(4)]
    starts: list[float] = []
    lock = threading.Lock()

    def work(limiter):
        for _ in range(50):
            slot = limiter.reserve("charge", max_wait_s=60)
            assert slot.granted
            with lock:
                starts.append(slot.start_s)

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts.sort()
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    interval = 0.02 * (1 + DEFAULT_MARGIN)
    assert len(starts) == 200
    assert min(gaps) >= interval - 1e-6
    assert max(gaps) <= interval + 1e-6      # back to back: nothing wasted


@pytest.mark.serial
def test_admitted_calls_are_evenly_paced_in_real_time(client):
    """4 workers × 25 admits at 50/s, real sleeps: at most 50 calls start in any 1-second
    window, and 100 calls take within 10 % of the ideal 99 intervals."""
    name = new_name()
    workers = [protection(client, name, RATE_LIMIT="50/s", MAX_WAIT=5) for _ in range(4)]
    arrivals: list[float] = []
    lock = threading.Lock()

    def work(p):
        for _ in range(25):
            permit = p.admit("charge")
            now = time.monotonic()
            permit.release(None)
            with lock:
                arrivals.append(now)

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    arrivals.sort()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    elapsed = arrivals[-1] - arrivals[0]
    ideal = 99 * 0.02
    print(f"\n50/s x4 workers: elapsed {elapsed:.3f}s (ideal {ideal:.3f}s); gap mean "
          f"{statistics.mean(gaps) * 1000:.2f} ms, stdev {statistics.pstdev(gaps) * 1000:.2f} ms, "
          f"min {min(gaps) * 1000:.2f} ms, max {max(gaps) * 1000:.2f} ms")
    assert max_in_window(arrivals) <= 50
    assert ideal <= elapsed * 1.001 and elapsed <= ideal * 1.10


def test_slot_beyond_max_wait_defers_and_reserves_nothing(client):
    """1/s with max wait 0.5 s: the second call is deferred by ≈ 1 s plus the margin, and so is a third:
    a deferral does not push the next slot further away."""
    p = protection(client, new_name(), RATE_LIMIT="1/s", MAX_WAIT="0.5")
    p.admit("charge").release(None)
    retries = []
    for _ in range(2):
        with pytest.raises(Deferred) as info:
            p.admit("charge")
        assert info.value.code == "rate_limited"
        retries.append(info.value.retry_after_s)
    assert 0.9 < retries[0] <= 1 + DEFAULT_MARGIN and 0.9 < retries[1] <= retries[0]


def test_slot_within_max_wait_sleeps_exactly_the_delay(client):
    """A slot 0.1 s away is waited for with one sleep of that length (injected), not polled."""
    slept: list[float] = []
    p = protection(client, new_name(), sleep=slept.append, RATE_LIMIT="10/s")
    p.admit("charge").release(None)
    permit = p.admit("charge")
    assert len(slept) == 1 and 0.09 < slept[0] <= 0.1 * (1 + DEFAULT_MARGIN)
    assert permit.waited_s >= 0


def test_operation_and_provider_limits_combine(client):
    """Provider 10/s, refunds 2/s: refunds are 0.5 s (plus margin) apart, and a charge right after a
    refund still waits the provider's 0.1 s (plus margin)."""
    name = new_name()
    limiter = protection(client, name, operations={"charge", "refund"}, RATE_LIMIT="10/s",
                         REFUND_RATE_LIMIT="2/s").limiter
    r1 = limiter.reserve("refund", 60).start_s
    c1 = limiter.reserve("charge", 60).start_s
    r2 = limiter.reserve("refund", 60).start_s
    c2 = limiter.reserve("charge", 60).start_s
    assert c1 - r1 == pytest.approx(0.1 * (1 + DEFAULT_MARGIN), abs=1e-5)
    assert r2 - r1 == pytest.approx(0.5 * (1 + DEFAULT_MARGIN), abs=1e-5)
    # the second refund's slot moved the provider-wide TAT too
    assert c2 - r2 == pytest.approx(0.1 * (1 + DEFAULT_MARGIN), abs=1e-5)


def test_pause_is_honoured_by_every_worker(client):
    """Worker A pauses the provider for 1 s; worker B (another Protection) defers with the
    remaining time when its max wait is shorter, and C sleeps through it when longer."""
    name = new_name()
    a = protection(client, name)
    b = protection(client, name, MAX_WAIT="0.5")
    c = protection(client, name, MAX_WAIT="2")
    assert a.pause(1.0) == pytest.approx(1.0, abs=0.01)
    with pytest.raises(Deferred) as info:
        b.admit("charge")
    assert info.value.code == "paused" and 0.9 < info.value.retry_after_s <= 1.0
    started = time.monotonic()
    c.admit("charge").release(None)
    assert time.monotonic() - started >= 0.85


def test_pause_keeps_the_later_end(client):
    name = new_name()
    a, b = protection(client, name), protection(client, name)
    a.pause(2.0)
    assert b.pause(0.5) == pytest.approx(2.0, abs=0.05)
    assert b.snapshot()["paused_for_s"] == pytest.approx(2.0, abs=0.05)


def test_a_worker_sleeping_for_its_slot_honours_a_pause_set_meanwhile(client):
    """A worker sleeps ≈1 s for its 1/s slot; 0.2 s in, another worker gets a 429 and pauses
    for 1.5 s: the sleeper does not call at its slot but after the pause."""
    name = new_name()
    sleeper = protection(client, name, RATE_LIMIT="1/s", MAX_WAIT="3")
    other = protection(client, name, RATE_LIMIT="1/s")
    sleeper.admit("charge").release(None)
    started = time.monotonic()
    timer = threading.Timer(0.2, other.pause, args=(1.5,))
    timer.start()
    sleeper.admit("charge").release(None)
    timer.join()
    assert time.monotonic() - started >= 1.65


# --- X-RateLimit headers ------------------------------------------------------------------

@pytest.mark.parametrize("headers, expected", [
    ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "3"}, 3.0),
    ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "2.5"}, 2.5),
    ({"RateLimit-Remaining": "0", "RateLimit-Reset": "7"}, 7.0),
    ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1700000005"}, 5.0),      # epoch s
    ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1700000004000"}, 4.0),   # epoch ms
    ({"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "3"}, None),
    ({"X-RateLimit-Remaining": "0"}, None),
    ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1699999990"}, None),     # past
    ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "soon"}, None),
    ({}, None),
])
def test_pause_from_headers(headers, expected):
    assert pause_from_headers(headers, now_s=1_700_000_000.0) == expected


def test_observe_remaining_zero_pauses_every_worker(client):
    name = new_name()
    a, b = protection(client, name), protection(client, name, MAX_WAIT="0")
    response = Response(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2"}, None, 0.01)
    assert a.observe(response) == pytest.approx(2.0, abs=0.01)
    with pytest.raises(Deferred) as info:
        b.admit("charge")
    assert 1.9 < info.value.retry_after_s <= 2.0
    assert a.observe(Response(200, {"X-RateLimit-Remaining": "5"}, None, 0.01)) is None


def test_a_worker_that_wakes_late_gives_its_slot_up(client):
    """Woken 50 ms after its slot (a loaded machine), a worker does not send late — it would
    land next to the following request — but reserves the next slot and waits for that."""
    name = new_name()
    limiter = protection(client, name, RATE_LIMIT="10/s").limiter
    ticks = iter([0.0, 0.050, 0.050, 0.050 + 0.104])   # reserve, late check, reserve, check
    slept = []
    waited = limiter.wait_for_slot("charge", 2.0, slept.append, monotonic=lambda: next(ticks))
    assert len(slept) == 1 and slept[0] == pytest.approx(0.1 * (1 + DEFAULT_MARGIN), abs=0.01)
    assert waited == pytest.approx(slept[0])
    # two slots were used: the late one given up, and the one this worker took
    third = limiter.reserve("charge", 2.0)
    assert third.delay_s == pytest.approx(2 * 0.1 * (1 + DEFAULT_MARGIN), abs=0.02)


def test_a_slow_redis_round_trip_is_not_mistaken_for_a_late_wakeup(client):
    """A 15 ms round trip to Redis (a remote server) must not make every slot 'late':
    all 20 calls at 1000/s are admitted without deferral."""
    import time

    limiter = protection(client, new_name(), RATE_LIMIT="1000/s").limiter
    real_reserve = limiter.reserve

    def distant_reserve(*args, **kwargs):
        time.sleep(0.015)
        return real_reserve(*args, **kwargs)

    limiter.reserve = distant_reserve
    for _ in range(20):
        limiter.wait_for_slot("charge", 2.0, time.sleep)
