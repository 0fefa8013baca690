"""Synthetic health checks against the sandbox, through real Redis: the result per
provider, the shared protection they go through, one relay per interval checking, and
what health, ``outbox status`` and ``/metrics`` make of a rejected credential."""

from __future__ import annotations

import redis
import requests

from integrations import checks
from integrations.registry import build_provider
from outbox import health
from tests.harness import free_port, run_cli

KEY = "sk_test_outbox"


def payments(sandbox, redis_url, key=KEY, **env):
    return build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": sandbox.url,
                                       "OUTBOX_PAYMENTS_API_KEY": key, **env}, redis=redis_url)


def email(sandbox, redis_url, key=KEY):
    return build_provider("email", {"OUTBOX_EMAIL_BASE_URL": sandbox.url,
                                    "OUTBOX_EMAIL_API_KEY": key,
                                    "OUTBOX_EMAIL_FROM": "a@example.com"}, redis=redis_url)


def balance_calls(sandbox) -> int:
    log = sandbox.state.stats(include_log=True)["request_log"]
    return sum(1 for r in log if r.get("path") == "/v1/balance")


def test_a_working_credential_passes_and_a_refused_one_is_rejected(sandbox, redis_url):
    good, bad = payments(sandbox, redis_url), payments(sandbox, redis_url, "sk_test_revoked")
    mail = email(sandbox, redis_url)
    try:
        ok = checks.run_check(good)
        assert (ok.ok, ok.status_code, ok.rejected) == (True, 200, False)
        refused = checks.run_check(bad)
        assert (refused.ok, refused.status_code, refused.rejected) == (False, 401, True)
        assert refused.reason == "credentials rejected (401)"
        assert checks.run_check(mail).ok
        requests.post(sandbox.url + "/_sandbox/faults", json={
            "fault": "error_before", "status": 503, "path": "/v1/balance", "count": 1},
            timeout=5).raise_for_status()
        down = checks.run_check(good)
        assert (down.ok, down.rejected, down.reason) == (False, False, "check failed: HTTP 503")
        assert sandbox.state.stats(include_log=False)["effects_total"] == 0   # read-only
    finally:
        for p in (good, bad, mail):
            p.close()


def test_a_provider_that_cannot_be_reached_fails_its_check_with_the_error_label(redis_url):
    unreachable = build_provider("payments", {
        "OUTBOX_PAYMENTS_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "OUTBOX_PAYMENTS_API_KEY": KEY}, redis=redis_url)
    try:
        down = checks.run_check(unreachable)
        assert (down.ok, down.rejected) == (False, False)
        assert down.reason == "check failed: transient connect_error"
    finally:
        unreachable.close()


def test_checks_go_through_the_shared_limiter_and_breaker(sandbox, redis_url):
    p = payments(sandbox, redis_url, OUTBOX_PAYMENTS_BREAKER_FAILURES="2",
                 OUTBOX_PAYMENTS_BREAKER_OPEN="60")
    try:
        requests.post(sandbox.url + "/_sandbox/faults", json={
            "fault": "error_before", "status": 503, "path": "/v1/balance", "count": 5},
            timeout=5).raise_for_status()
        for _ in range(2):
            assert not checks.run_check(p).ok   # each failure is told to the breaker
        assert p.protection.breaker.state()["state"] == "open"
        calls = balance_calls(sandbox)
        assert checks.run_check(p) is None   # open breaker: skipped, nothing sent
        assert balance_calls(sandbox) == calls
    finally:
        p.close()


def test_one_runner_checks_per_interval_and_everyone_reads_the_result(sandbox, redis_url,
                                                                      monkeypatch, capsys,
                                                                      sqlite_url):
    client = redis.Redis.from_url(redis_url)
    bad = payments(sandbox, redis_url, "sk_test_revoked")
    try:
        runners = [checks.CheckRunner(lambda: {"payments": bad}, client, 60) for _ in range(2)]
        assert set(runners[0].run_once()) == {"payments"}
        assert runners[1].run_once() == {}   # the other relay: already checked this interval
        assert balance_calls(sandbox) == 1
        stored = checks.load(client, "payments")
        assert stored["rejected"] and 0 < client.ttl("outbox:check:payments") <= 180

        found = health.provider_findings(
            {"depth": 0, "dead_last_hour": 0, "attempts_5m": 0, "failures_5m": 0,
             "failures_by_code_5m": {}}, {"check": stored}, 0.0)
        assert [(f.check, f.level, f.reason) for f in found] == [
            ("check", "critical", "health check: credentials rejected (401)")]

        # outbox status, in a process whose REDIS_URL is this Redis, says so too.
        monkeypatch.setenv("DATABASE_URL", sqlite_url)
        monkeypatch.setenv("REDIS_URL", redis_url)
        monkeypatch.setenv("OUTBOX_PAYMENTS_BASE_URL", sandbox.url)
        monkeypatch.setenv("OUTBOX_PAYMENTS_API_KEY", "sk_test_revoked")
        from integrations import registry
        registry.reset()
        try:
            code, out, _ = run_cli(capsys, "status")
        finally:
            registry.reset()
        assert code == 2
        assert "CRITICAL: health check: credentials rejected (401)" in out
    finally:
        bad.close()
        client.close()


def test_the_interval_is_checked(monkeypatch):
    assert checks.interval_s({}) == 120
    assert checks.interval_s({"OUTBOX_CHECK_INTERVAL": "300"}) == 300
    assert checks.interval_s({"OUTBOX_CHECKS": "off"}) is None
    import pytest

    from integrations.errors import ConfigurationError
    for bad in ("30", "301", "2m", "-1"):
        with pytest.raises(ConfigurationError, match="OUTBOX_CHECK_INTERVAL"):
            checks.interval_s({"OUTBOX_CHECK_INTERVAL": bad})
