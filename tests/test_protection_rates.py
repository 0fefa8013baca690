"""Rate-limit specs and protection settings: parsing, and errors that name what is wrong."""

from __future__ import annotations

import pytest

from integrations.errors import ConfigurationError
from integrations.protection import ProtectionSettings, RateSpec
from integrations.registry import build_provider


@pytest.mark.parametrize("spec, count, period_s", [
    ("50/s", 50, 1.0), ("600/m", 600, 60.0), ("1000/h", 1000, 3600.0), ("10/d", 10, 86400.0),
    (" 20 / S ", 20, 1.0),
])
def test_parse_valid_specs(spec, count, period_s):
    rate = RateSpec.parse(spec)
    assert (rate.count, rate.period_s) == (count, period_s)
    assert rate.interval_s == pytest.approx(period_s / count)


def test_str_gives_back_the_spec():
    assert [str(RateSpec.parse(s)) for s in ("50/s", "600/m", "1000/h", "10/d")] == [
        "50/s", "600/m", "1000/h", "10/d"]


def test_spec_is_an_immutable_value():
    rate = RateSpec.parse("50/s")
    assert rate == RateSpec(50, 1.0) and hash(rate) == hash(RateSpec(50, 1.0))
    with pytest.raises(AttributeError):
        rate.count = 5  # type: ignore[misc]


@pytest.mark.parametrize("spec", ["fast", "0/s", "-1/m", "50/x", "", "   ", "50", "/s",
                                  "1.5/s", "50/s/s"])
def test_bad_specs_quote_the_spec_and_say_the_form(spec):
    with pytest.raises(ValueError) as info:
        RateSpec.parse(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "COUNT/UNIT" in message and "'50/s'" in message


def test_direct_construction_is_validated():
    with pytest.raises(ValueError):
        RateSpec(0, 1.0)
    with pytest.raises(ValueError):
        RateSpec(5, 0.0)


# --- settings ---------------------------------------------------------------------------

def test_settings_defaults():
    s = ProtectionSettings.from_env("payments", {})
    assert s.rate_limit is None and s.max_concurrency is None and s.daily_quota is None
    assert (s.breaker.failures, s.breaker.ratio, s.breaker.min_calls, s.breaker.window_s,
            s.breaker.open_s, s.breaker.probes) == (20, 0.5, 10, 30.0, 15.0, 1)
    assert s.max_wait_s == 2.0 and s.rate_margin == 0.03


def test_settings_from_env():
    s = ProtectionSettings.from_env("payments", {
        "OUTBOX_PAYMENTS_RATE_LIMIT": "50/s", "OUTBOX_PAYMENTS_REFUND_RATE_LIMIT": "5/s",
        "OUTBOX_PAYMENTS_MAX_CONCURRENCY": "3", "OUTBOX_PAYMENTS_DAILY_QUOTA": "1000",
        "OUTBOX_PAYMENTS_BREAKER_RATIO": "25%", "OUTBOX_PAYMENTS_MAX_WAIT": "0",
        "OUTBOX_PAYMENTS_RATE_MARGIN": "5%", "OUTBOX_PAYMENTS_CONCURRENCY_LEASE": "7.5",
    }, operations={"charge", "refund"})
    assert s.rate_limit == RateSpec(50, 1.0)
    assert s.operation_rate("refund") == RateSpec(5, 1.0) and s.operation_rate("charge") is None
    assert (s.max_concurrency, s.daily_quota, s.max_wait_s) == (3, 1000, 0.0)
    assert s.breaker.ratio == 0.25 and s.rate_margin == pytest.approx(0.05)
    assert s.concurrency_lease_s == 7.5


def test_adapter_defaults_apply_unless_the_environment_overrides():
    s = ProtectionSettings.from_env("payments", {"OUTBOX_PAYMENTS_RATE_LIMIT": "10/s"},
                                    operations={"charge"}, default_rate_limit="100/s",
                                    default_operation_rate_limits={"charge": "20/s"})
    assert s.rate_limit == RateSpec(10, 1.0) and s.operation_rate("charge") == RateSpec(20, 1.0)


@pytest.mark.parametrize("variable, value", [
    ("OUTBOX_PAYMENTS_RATE_LIMIT", "fast"),
    ("OUTBOX_PAYMENTS_RATE_LIMIT", "0/s"),
    ("OUTBOX_PAYMENTS_RATE_LIMIT", "-1/m"),
    ("OUTBOX_PAYMENTS_REFUND_RATE_LIMIT", "50/x"),
    ("OUTBOX_PAYMENTS_MAX_CONCURRENCY", "0"),
    ("OUTBOX_PAYMENTS_DAILY_QUOTA", "lots"),
    ("OUTBOX_PAYMENTS_BREAKER_FAILURES", "0"),
    ("OUTBOX_PAYMENTS_BREAKER_RATIO", "1.5"),
    ("OUTBOX_PAYMENTS_BREAKER_MIN_CALLS", "-2"),
    ("OUTBOX_PAYMENTS_BREAKER_WINDOW", "0"),
    ("OUTBOX_PAYMENTS_BREAKER_OPEN", "soon"),
    ("OUTBOX_PAYMENTS_BREAKER_PROBES", "0"),
    ("OUTBOX_PAYMENTS_MAX_WAIT", "-1"),
    ("OUTBOX_PAYMENTS_RATE_MARGIN", "60%"),
    ("OUTBOX_PAYMENTS_CONCURRENCY_LEASE", "0"),
    ("OUTBOX_PAYMENTS_REFUDN_RATE_LIMIT", "5/s"),   # a typo: no such operation
])
def test_bad_values_name_the_variable(variable, value):
    with pytest.raises(ConfigurationError) as info:
        ProtectionSettings.from_env("payments", {variable: value},
                                    operations={"charge", "refund"})
    assert variable in str(info.value)
    assert value in str(info.value) or "no operation 'refudn'" in str(info.value)


@pytest.mark.parametrize("spec", ["fast", "0/s", "-1/m"])
def test_build_provider_refuses_bad_specs_at_start_up(spec):
    """Protection settings are built eagerly with the provider, even when unprotected."""
    with pytest.raises(ConfigurationError, match=r"OUTBOX_PAYMENTS_RATE_LIMIT.*" + spec):
        build_provider("payments", {"OUTBOX_PAYMENTS_RATE_LIMIT": spec})
