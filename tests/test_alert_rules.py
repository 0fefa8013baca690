"""``ops/prometheus/alerts.yml``: valid for Prometheus, unit-tested with promtool's own test
series (``alerts_test.yml``: dead letters, error rate, breaker, depth, latency), and every
metric it reads is one that ``/metrics`` serves. The Grafana dashboard loads as JSON and
reads only served metrics too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.harness import ROOT

OPS = ROOT / "ops"
RULES = OPS / "prometheus" / "alerts.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not installed: run scripts/install_system_packages.sh (Debian's "
                    "prometheus package) or make test", pytrace=False)
    return path


def test_rules_are_valid(promtool):
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 16 rules found" in done.stdout


def test_rules_pass_their_unit_tests(promtool):
    done = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=RULES.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def _read_metrics(text: str) -> set[str]:
    """The outbox_* series names an expression reads (recording rules' own names aside)."""
    return {m for m in re.findall(r"\b(outbox_[a-z_]+)", text)}


def _served(web) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for family in text_string_to_metric_families(web.get("/metrics").text):
        names |= {s.name for s in family.samples}
    return names


@pytest.fixture
def web(sessions):
    from fastapi.testclient import TestClient

    import schemas
    from web.admin import create_app
    from web.auth import WebAuth

    facts = {"payments": {"protection": {"breaker": {"state": "closed"}, "paused_for_s": 0.0,
                                         "rate_limit_per_s": 20.0, "daily_quota": 1000,
                                         "quota_used": 5, "max_concurrency": 8,
                                         "permits_in_use": 1},
                          "latency_baseline_ms": 1000.0,
                          "check": {"ok": False, "reason": "credentials rejected (401)",
                                    "at": 1.0, "duration_ms": 3.0, "rejected": True}},
             "email": {"protection": {"breaker": {"state": "closed"}, "paused_for_s": 0.0},
                       "latency_baseline_ms": 1000.0}}
    app = create_app(sessions, WebAuth.from_env({"OUTBOX_WEB_AUTH": "a:correct-horse-battery"}),
                     facts=lambda: facts, operations=schemas.operations())
    with TestClient(app) as client:
        yield client


@pytest.fixture
def db_url(sqlite_url):
    return sqlite_url


def test_every_metric_the_rules_and_dashboard_read_is_served(web, sessions):
    from datetime import timedelta

    from outbox import enqueue
    from outbox.models import Attempt

    with sessions() as s:   # one attempt, so that the counter and histogram have series
        m = enqueue(s, provider="payments", operation="charge",
                    payload={"amount": 1, "currency": "usd"}, idempotency_key="k")
        s.add(Attempt(message_id=m.id, lease_token=1, started_at=m.created_at,
                      duration_ms=12.0, outcome="delivered", status_code=200))
        s.add(Attempt(message_id=m.id, lease_token=1,
                      started_at=m.created_at + timedelta(seconds=1), duration_ms=0.0,
                      outcome="deferred", error_class="deferred"))
        s.commit()
    served = _served(web)
    wanted = _read_metrics(RULES.read_text())
    wanted |= _read_metrics((OPS / "grafana" / "outbox.json").read_text())
    missing = wanted - served
    assert not missing, f"read by the rules or dashboard but not served: {sorted(missing)}"


def test_the_grafana_dashboard_loads():
    board = json.loads((OPS / "grafana" / "outbox.json").read_text())
    assert board["title"] and board["panels"]
    for panel in board["panels"]:
        for target in panel.get("targets", ()):
            assert target["expr"].strip()
