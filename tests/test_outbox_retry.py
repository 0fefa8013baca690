"""Pure tests of the retry policy value and its configuration from the environment."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from outbox import config
from outbox.errors import ConfigurationError
from outbox.retry import RetryPolicy

NO_JITTER = RetryPolicy(jitter=0.0)
T0 = datetime(2026, 1, 1, 12, 0, 0)


def test_backoff_doubles_from_the_base_delay():
    """Without jitter the n-th delay is base * 2**(n-1): 1, 2, 4, 8, 16 s."""
    delays = [NO_JITTER.backoff(n).total_seconds() for n in range(1, 6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_backoff_respects_base_and_multiplier():
    """A 0.5 s base tripling gives 0.5, 1.5, 4.5 s."""
    policy = RetryPolicy(base_delay=timedelta(seconds=0.5), multiplier=3.0, jitter=0.0)
    assert [policy.backoff(n).total_seconds() for n in (1, 2, 3)] == [0.5, 1.5, 4.5]


def test_backoff_is_capped_at_max_delay():
    """Delays stop growing at max_delay (300 s by default), even for absurd attempt numbers."""
    assert NO_JITTER.backoff(9) == timedelta(seconds=256)
    assert NO_JITTER.backoff(10) == timedelta(minutes=5)
    assert NO_JITTER.backoff(10_000) == timedelta(minutes=5)


def test_attempt_zero_is_treated_as_the_first():
    """backoff(0) does not go below the base delay."""
    assert NO_JITTER.backoff(0) == timedelta(seconds=1)


def test_jitter_stays_within_zero_to_25_percent_over_many_seeds():
    """For 500 seeds and attempts 1..12 the jittered delay is within [raw, raw * 1.25]."""
    policy = RetryPolicy()
    spreads = []
    for seed in range(500):
        rng = random.Random(seed)
        for attempt in range(1, 13):
            raw = NO_JITTER.backoff(attempt).total_seconds()
            delay = policy.backoff(attempt, rng).total_seconds()
            assert raw <= delay <= raw * 1.25 + 1e-6, (seed, attempt, delay)
            spreads.append(delay / raw - 1)
    # the jitter is actually used across its range, not a constant
    assert min(spreads) < 0.02 and max(spreads) > 0.23


def test_jitter_is_deterministic_for_a_seeded_rng():
    """The same seed gives the same delay: 1 s * (1 + uniform(0, 0.25)) for Random(0)."""
    expected = 1.0 * (1 + random.Random(0).uniform(0, 0.25))
    assert RetryPolicy().backoff(1, random.Random(0)).total_seconds() == pytest.approx(expected)


def test_retry_after_wins_over_backoff():
    """A Retry-After of 42 s is used as is, even on attempt 10 (backoff would be 300 s)."""
    assert RetryPolicy().next_attempt_at(T0, 10, retry_after_s=42) == T0 + timedelta(seconds=42)


def test_negative_retry_after_means_now():
    """A Retry-After in the past does not schedule into the past."""
    assert RetryPolicy().next_attempt_at(T0, 3, retry_after_s=-5) == T0


def test_next_attempt_at_without_retry_after_is_now_plus_backoff():
    """Attempt 3 without jitter: now + 4 s."""
    assert NO_JITTER.next_attempt_at(T0, 3) == T0 + timedelta(seconds=4)


@pytest.mark.parametrize("kwargs", [
    {"base_delay": timedelta(0)},
    {"base_delay": timedelta(seconds=-1)},
    {"base_delay": timedelta(seconds=10), "max_delay": timedelta(seconds=5)},
    {"multiplier": 0.5},
    {"jitter": -0.1},
    {"jitter": 1.5},
    {"max_attempts": 0},
    {"max_age": timedelta(0)},
])
def test_invalid_policies_raise_value_error(kwargs):
    """Nonsensical policies are refused when built."""
    with pytest.raises(ValueError, match="retry policy"):
        RetryPolicy(**kwargs)


def test_defaults_survive_a_one_hour_outage():
    """The default budget waits at least an hour (no jitter) before dead-lettering."""
    patience = RetryPolicy().patience()
    assert patience >= timedelta(hours=1)
    # 1+2+…+256 s, then 15 capped delays of 300 s: 5011 s
    assert patience == timedelta(seconds=511 + 15 * 300)


def test_patience_is_bounded_by_max_age():
    """A policy whose max_age is shorter than its backoff sum reports max_age."""
    assert RetryPolicy(max_age=timedelta(minutes=10)).patience() == timedelta(minutes=10)


def test_exhausted_by_attempts():
    """At max_attempts the budget is spent and the reason says so."""
    policy = RetryPolicy(max_attempts=5)
    assert policy.exhausted(4, T0, T0) is None
    assert policy.exhausted(5, T0, T0) == "attempts exhausted (5/5)"


def test_exhausted_by_max_age():
    """Once max_age has passed since the budget started, it is spent."""
    policy = RetryPolicy(max_age=timedelta(hours=1))
    assert policy.exhausted(1, T0, T0 + timedelta(minutes=59, seconds=59)) is None
    reason = policy.exhausted(1, T0, T0 + timedelta(hours=1))
    assert reason is not None and reason.startswith("max age passed")


def test_config_reads_the_provider_variables():
    """OUTBOX_<NAME>_MAX_ATTEMPTS, _RETRY_BASE, _RETRY_CAP and _MAX_AGE shape the policy."""
    environ = {"OUTBOX_PAYMENTS_MAX_ATTEMPTS": "7", "OUTBOX_PAYMENTS_RETRY_BASE": "0.5",
               "OUTBOX_PAYMENTS_RETRY_CAP": "60", "OUTBOX_PAYMENTS_MAX_AGE": "3600",
               "OUTBOX_EMAIL_MAX_ATTEMPTS": "99"}
    policy = config.retry_policy("payments", environ)
    assert policy.max_attempts == 7
    assert policy.base_delay == timedelta(seconds=0.5)
    assert policy.max_delay == timedelta(seconds=60)
    assert policy.max_age == timedelta(hours=1)


def test_config_defaults_when_unset_or_empty():
    """Unset and empty variables give the default policy."""
    assert config.retry_policy("payments", {}) == RetryPolicy()
    assert config.retry_policy("payments", {"OUTBOX_PAYMENTS_MAX_ATTEMPTS": " "}) == RetryPolicy()


@pytest.mark.parametrize("name, value", [
    ("OUTBOX_PAYMENTS_MAX_ATTEMPTS", "ten"),
    ("OUTBOX_PAYMENTS_MAX_ATTEMPTS", "0"),
    ("OUTBOX_PAYMENTS_MAX_ATTEMPTS", "2.5"),
    ("OUTBOX_PAYMENTS_RETRY_BASE", "-1"),
    ("OUTBOX_PAYMENTS_RETRY_BASE", "fast"),
    ("OUTBOX_PAYMENTS_RETRY_CAP", "0"),
    ("OUTBOX_PAYMENTS_RETRY_CAP", "inf"),
    ("OUTBOX_PAYMENTS_MAX_AGE", "nan"),
])
def test_config_bad_values_name_the_variable(name, value):
    """A bad value raises ConfigurationError that names the variable and the value."""
    with pytest.raises(ConfigurationError) as info:
        config.retry_policy("payments", {name: value})
    assert name in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("environ", [
    {"OUTBOX_PAYMENTS_RETRY_BASE": "600"},                    # base above the 300 s default cap
    {"OUTBOX_PAYMENTS_MAX_AGE": "1e20"},                      # beyond what a timedelta holds
])
def test_config_inconsistent_or_huge_values_are_configuration_errors(environ):
    """Values each fine alone but unusable together (or too big) still raise ConfigurationError."""
    with pytest.raises(ConfigurationError, match="OUTBOX_PAYMENTS_"):
        config.retry_policy("payments", environ)
