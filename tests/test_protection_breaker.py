"""The shared circuit breaker against real Redis: thresholds, half-open probes, what counts."""

from __future__ import annotations

import logging
import time

import pytest

from integrations.errors import (
    Ambiguous,
    AuthError,
    ClientError,
    Deferred,
    InvalidResponse,
    RateLimited,
    Transient,
)
from tests.protection_helpers import new_name, protection


def call(p, error=None):
    """One admitted call that ends with ``error`` (None = success)."""
    permit = p.admit("charge")
    permit.release(error)
    return permit


def open_breaker(p, failures):
    for _ in range(failures):
        call(p, Transient("503"))


def test_opens_after_n_transient_failures_and_makes_no_call(client, caplog):
    name = new_name()
    p = protection(client, name, BREAKER_FAILURES=3, BREAKER_OPEN=10)
    caplog.set_level(logging.WARNING, logger="integrations.breaker")
    call(p, Transient("503"))
    call(p, Ambiguous("read timeout"))
    assert p.breaker.state()["state"] == "closed"
    call(p, Transient("connect refused"))
    with pytest.raises(Deferred) as info:
        p.admit("charge")
    assert info.value.code == "breaker_open"
    assert 9.5 < info.value.retry_after_s <= 10
    [record] = [r for r in caplog.records if r.name == "integrations.breaker"]
    assert record.levelno == logging.WARNING and record.provider == name
    assert (record.breaker_from, record.breaker_to) == ("closed", "open")
    assert f"breaker {name}: closed -> open" in record.getMessage()


def test_failure_ratio_opens_once_min_calls_are_reached(client):
    """Ratio 0.5 over at least 4 calls (count rule out of reach): 1 of 2 failing is not enough
    calls yet; 2 of 4 opens it."""
    p = protection(client, new_name(), BREAKER_FAILURES=100, BREAKER_RATIO="0.5",
                   BREAKER_MIN_CALLS=4)
    call(p)
    call(p, Transient("503"))
    call(p)
    assert p.breaker.state()["state"] == "closed"
    call(p, Transient("503"))
    state = p.breaker.state()
    assert state["state"] == "open" and state["half_open_in_s"] > 0


def test_window_forgets_old_failures(client):
    p = protection(client, new_name(), BREAKER_FAILURES=2, BREAKER_WINDOW="0.2")
    call(p, Transient("503"))
    time.sleep(0.25)
    call(p, Transient("503"))
    assert p.breaker.state()["state"] == "closed"


@pytest.mark.parametrize("error", [
    ClientError("422"), AuthError("401"), InvalidResponse("bad body"),
    RateLimited("429", retry_after_s=1), RuntimeError("adapter bug"),
])
def test_client_errors_429s_and_bugs_do_not_count(client, error):
    p = protection(client, new_name(), BREAKER_FAILURES=2, BREAKER_MIN_CALLS=2)
    for _ in range(10):
        call(p, error)
    state = p.breaker.state()
    assert state["state"] == "closed" and state["failures"] == 0


def test_half_open_admits_at_most_probes(client):
    p = protection(client, new_name(), BREAKER_FAILURES=1, BREAKER_OPEN="0.2",
                   BREAKER_PROBES=2)
    open_breaker(p, 1)
    time.sleep(0.25)
    first, second = p.admit("charge"), p.admit("charge")
    assert first.probe and second.probe
    with pytest.raises(Deferred) as info:
        p.admit("charge")
    assert info.value.code == "breaker_half_open" and info.value.retry_after_s == 0.2
    assert p.breaker.state()["probes_in_flight"] == 2


def test_probe_success_closes(client, caplog):
    caplog.set_level(logging.WARNING, logger="integrations.breaker")
    p = protection(client, new_name(), BREAKER_FAILURES=1, BREAKER_OPEN="0.2")
    open_breaker(p, 1)
    time.sleep(0.25)
    probe = p.admit("charge")
    probe.release(None)
    assert p.breaker.state()["state"] == "closed"
    assert not p.admit("charge").probe
    moves = [(r.breaker_from, r.breaker_to) for r in caplog.records
             if r.name == "integrations.breaker"]
    assert moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_probe_failure_reopens(client):
    p = protection(client, new_name(), BREAKER_FAILURES=1, BREAKER_OPEN="0.2")
    open_breaker(p, 1)
    time.sleep(0.25)
    p.admit("charge").release(Transient("503"))
    state = p.breaker.state()
    assert state["state"] == "open" and 0.1 < state["half_open_in_s"] <= 0.2
    with pytest.raises(Deferred):
        p.admit("charge")


def test_neutral_probe_returns_its_permit_and_stays_half_open(client):
    p = protection(client, new_name(), BREAKER_FAILURES=1, BREAKER_OPEN="0.2")
    open_breaker(p, 1)
    time.sleep(0.25)
    p.admit("charge").release(RateLimited("429"))
    assert p.breaker.state()["state"] == "half_open"
    assert p.admit("charge").probe


def test_a_crashed_probe_frees_its_permit_after_the_lease(client):
    p = protection(client, new_name(), BREAKER_FAILURES=1, BREAKER_OPEN="0.2",
                   CONCURRENCY_LEASE="0.3")
    open_breaker(p, 1)
    time.sleep(0.25)
    assert p.admit("charge").probe          # its worker dies: never released
    with pytest.raises(Deferred):
        p.admit("charge")
    time.sleep(0.35)
    assert p.admit("charge").probe


def test_state_is_shared_between_workers(client):
    name = new_name()
    a = protection(client, name, BREAKER_FAILURES=2)
    b = protection(client, name, BREAKER_FAILURES=2)
    call(a, Transient("503"))
    call(b, Transient("503"))
    with pytest.raises(Deferred):
        a.admit("charge")
    with pytest.raises(Deferred):
        b.admit("charge")
    state = b.snapshot()["breaker"]
    assert state["state"] == "open"
    assert state["opened_at"] == pytest.approx(time.time(), abs=5)
    assert state["until"] == pytest.approx(state["opened_at"] + 15, abs=0.01)


def test_breaker_open_defers_before_taking_a_permit_or_slot(client):
    """While open, nothing is held: permits stay free and no rate-limit slot is reserved."""
    p = protection(client, new_name(), BREAKER_FAILURES=1, MAX_CONCURRENCY=1,
                   RATE_LIMIT="1/m", MAX_WAIT=0)
    open_breaker(p, 1)
    with pytest.raises(Deferred, match="breaker"):
        p.admit("charge")
    assert p.snapshot()["permits_in_use"] == 0
