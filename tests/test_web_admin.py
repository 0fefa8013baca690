"""The admin app in-process (FastAPI's TestClient) on the real databases and the sandbox:
authentication, CSRF, bulk re-drive behind a preview, metrics that agree with the
database, health levels, no secret or customer datum on any page, and no 500 on bad input.
The browser test is ``test_e2e_web_ui.py``."""

from __future__ import annotations

import random
import re
from datetime import timedelta

import pytest
import requests
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

import schemas
from integrations.registry import build_provider
from outbox import enqueue, totals
from outbox.clock import utcnow
from outbox.models import AttemptTotal, AuditEntry, Message, MessageStatus
from tasks.delivery import deliver_message
from tests.harness import run_cli
from web.admin import create_app
from web.auth import WebAuth

USER, PASSWORD, TOKEN = "admin", "correct-horse-battery", "t0ken-for-scripts-0123456789"
ENV = {"OUTBOX_WEB_AUTH": f"{USER}:{PASSWORD}", "OUTBOX_WEB_TOKEN": TOKEN}
LEASE = timedelta(seconds=60)
# Tests about the app itself, not the database's part: SQLite only.
app_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
CANARY_KEY = "sk_test_CANARYa1b2c3d4e5"
CANARY_CUSTOMER = "cus_CANARY7f3a9"
CANARY_EMAIL = "canary.7f3a9@example.com"
API_ROUTES = [("get", "/api/openapi.json"), ("get", "/api/messages/01ABC"),
              ("get", "/api/dead-letters"),
              ("post", "/api/dead-letters/redrive"), ("post", "/api/dead-letters/discard")]


@pytest.fixture(autouse=True)
def _recorded(publisher):
    """Re-drives are published to a recorder, not to a broker nobody consumes."""
    return publisher


@pytest.fixture
def facts():
    """The providers' live state as the app would see it (a breaker open on payments)."""
    state = {"payments": {"protection": {"breaker": {"state": "closed"}, "paused_for_s": 0.0},
                          "credential": None, "settings_error": None,
                          "latency_baseline_ms": 1000.0},
             "email": {"protection": {"breaker": {"state": "closed"}, "paused_for_s": 0.0},
                       "credential": None, "settings_error": None,
                       "latency_baseline_ms": 1000.0}}
    return state


@pytest.fixture
def app(sessions, facts):
    return create_app(sessions, WebAuth.from_env(ENV), facts=lambda: facts,
                      operations=schemas.operations())


@pytest.fixture
def web(app):
    with TestClient(app) as client:
        yield client


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page)[1]


def login(web) -> str:
    """Log in through the form; the CSRF token of the logged-in session."""
    token = csrf_of(web.get("/login").text)
    r = web.post("/login", data={"username": USER, "password": PASSWORD, "csrf": token,
                                 "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return csrf_of(web.get("/").text)


@pytest.fixture
def provider(sandbox):
    p = build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": sandbox.url,
                                    "OUTBOX_PAYMENTS_API_KEY": "sk_test_outbox",
                                    "OUTBOX_PAYMENTS_TIMEOUT": "2"})
    yield p
    p.close()


def add(sessions, key, customer="cus_ok", **extra) -> str:
    with sessions() as s:
        m = enqueue(s, provider="payments", operation="charge",
                    payload={"amount": 1999, "currency": "usd", "customer": customer},
                    idempotency_key=key, **extra)
        s.commit()
        return m.id


def deliver(sessions, provider, message_id):
    """One attempt, as the worker makes it."""
    return deliver_message(message_id, sessions=sessions, lease=LEASE,
                           provider_for=lambda _: provider, clock=utcnow,
                           rng=random.Random(1))


def make_dead(sessions, provider, sandbox, n, prefix="dead"):
    sandbox.state.configure(declined_customers=["cus_declined"])
    ids = [add(sessions, f"{prefix}-{i}", customer="cus_declined") for i in range(n)]
    for message_id in ids:
        assert deliver(sessions, provider, message_id).outcome == "dead"
    return ids


def status_of(sessions, message_id):
    with sessions() as s:
        return s.get(Message, message_id).status


# ---- authentication and CSRF --------------------------------------------------------------

@app_only
def test_the_api_needs_credentials_on_every_route(web):
    for method, path in API_ROUTES:
        r = getattr(web, method)(path, **({"json": {"reason": "x"}} if method == "post" else {}))
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Basic")
        assert "authentication required" in r.json()["error"]
        bad = getattr(web, method)(path, auth=(USER, "wrong-password-123"))
        assert bad.status_code == 401, path
        assert getattr(web, method)(path, headers={"Authorization": "Bearer nope"}).status_code \
            == 401
    assert web.get("/api/dead-letters", auth=(USER, PASSWORD)).status_code == 200
    ok = web.get("/api/dead-letters", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json() == {"total": 0, "dead_letters": []}


@app_only
def test_a_logged_in_browser_session_does_not_authenticate_the_api(web):
    login(web)
    assert web.get("/api/dead-letters").status_code == 401


@app_only
def test_pages_send_to_the_login_form_and_wrong_passwords_are_refused(web):
    for path in ("/", "/dead-letters", "/messages/01ABC", "/audit"):
        r = web.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    token = csrf_of(web.get("/login").text)
    r = web.post("/login", data={"username": USER, "password": "not-the-password",
                                 "csrf": token})
    assert r.status_code == 401 and "wrong user name or password" in r.text
    assert web.get("/", follow_redirects=False).status_code == 303
    login(web)
    assert web.get("/").status_code == 200


@app_only
def test_login_never_redirects_off_site(web):
    token = csrf_of(web.get("/login").text)
    r = web.post("/login", data={"username": USER, "password": PASSWORD, "csrf": token,
                                 "next": "//evil.example/"}, follow_redirects=False)
    assert r.headers["location"] == "/"


@app_only
def test_state_changing_forms_refuse_a_missing_or_foreign_csrf_token(web, app, sessions,
                                                                     provider, sandbox):
    [dead] = make_dead(sessions, provider, sandbox, 1)
    token = login(web)
    form = {"action": "redrive", "reason": "fixed", "provider": "payments", "confirm": "true"}
    with TestClient(app) as other:   # another browser's session: its own token
        foreign = csrf_of(other.get("/login").text)
    for bad in ({}, {"csrf": "forged"}, {"csrf": foreign}):
        for path in ("/dead-letters/preview", "/dead-letters/apply"):
            r = web.post(path, data=form | bad)
            assert r.status_code == 403 and "CSRF" in r.text, (path, bad)
        r = web.post(f"/messages/{dead}/redrive", data={"reason": "x"} | bad)
        assert r.status_code == 403
    assert status_of(sessions, dead) == MessageStatus.DEAD
    assert web.post("/logout", data={}).status_code == 403
    r = web.post(f"/messages/{dead}/redrive", data={"reason": "fixed", "csrf": token},
                 follow_redirects=False)
    assert r.status_code == 303 and status_of(sessions, dead) == MessageStatus.QUEUED


def test_web_refuses_to_start_without_strong_credentials(capsys, monkeypatch, sqlite_url):
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.delenv("OUTBOX_WEB_AUTH", raising=False)
    code, _, err = run_cli(capsys, "web", "--port", "0")
    assert code == 2 and "OUTBOX_WEB_AUTH=user:password is required" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv("OUTBOX_WEB_AUTH", "admin:short")
    code, _, err = run_cli(capsys, "web", "--port", "0")
    assert code == 2 and "at least 12 characters" in err and "short" not in err.split(":", 2)[2]


# ---- dead letters: filter, preview, confirm, audit -----------------------------------------

def test_bulk_redrive_previews_then_acts_on_confirmation_and_is_audited(web, sessions,
                                                                        provider, sandbox,
                                                                        publisher):
    dead = make_dead(sessions, provider, sandbox, 3)
    token = login(web)
    page = web.get("/dead-letters?provider=payments")
    assert 'id="dead-total">(3)' in page.text
    assert all(m in page.text for m in dead)

    form = {"csrf": token, "action": "redrive", "reason": "card fixed", "provider": "payments"}
    preview = web.post("/dead-letters/preview", data=form)
    assert preview.status_code == 200
    assert re.search(r'id="would-count">3<', preview.text)
    assert all(status_of(sessions, m) == MessageStatus.DEAD for m in dead)   # a dry run

    unconfirmed = web.post("/dead-letters/apply", data=form)
    assert unconfirmed.status_code == 400 and "confirm" in unconfirmed.text
    assert all(status_of(sessions, m) == MessageStatus.DEAD for m in dead)

    published = len(publisher.published)
    done = web.post("/dead-letters/apply", data=form | {"confirm": "true"})
    assert done.status_code == 200 and "3 of 3 dead letter(s) re-driven" in done.text
    assert all(status_of(sessions, m) == MessageStatus.QUEUED for m in dead)
    assert sorted(ref.id for ref in publisher.published[published:]) == sorted(dead)
    audit = web.get("/audit").text
    assert re.search(r"<td>admin</td><td>redrive</td>\s*<td class=\"num\">3</td>"
                     r"<td>card fixed</td>", audit)


def test_filters_find_a_dead_letter_by_key_and_needs_review_is_warned(web, sessions, provider,
                                                                     sandbox):
    [a, b] = make_dead(sessions, provider, sandbox, 2)
    with sessions() as s:   # as an ambiguous failure of a provider that cannot deduplicate
        s.execute(update(Message).where(Message.id == b).values(needs_review=True))
        s.commit()
    token = login(web)
    page = web.get("/dead-letters", params={"text": "dead-0"})
    assert 'id="dead-total">(1)' in page.text and a in page.text and b not in page.text
    assert "needs review" in web.get("/dead-letters").text
    preview = web.post("/dead-letters/preview", data={
        "csrf": token, "action": "redrive", "reason": "r", "provider": "payments"})
    assert re.search(r'id="would-count">1<', preview.text)
    assert "1 of them need review" in preview.text and "may do it twice" in preview.text


def test_two_operators_redriving_at_once_make_one_redrive(app, sessions, provider, sandbox):
    import threading

    [dead] = make_dead(sessions, provider, sandbox, 1)
    results = []

    def operator():
        with TestClient(app) as c:
            r = c.post("/api/dead-letters/redrive", auth=(USER, PASSWORD),
                       json={"reason": "both", "ids": [dead]})
            results.append(r.json()["done"])

    threads = [threading.Thread(target=operator) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(AuditEntry)) == 1


def test_api_mirrors_the_cli(web, sessions, provider, sandbox):
    [dead] = make_dead(sessions, provider, sandbox, 1)
    auth = (USER, PASSWORD)
    detail = web.get(f"/api/messages/{dead}", auth=auth).json()
    assert detail["status"] == "dead" and detail["attempts_timeline"][0]["status_code"] == 402
    listed = web.get("/api/dead-letters", params={"provider": "payments"}, auth=auth).json()
    assert [m["id"] for m in listed["dead_letters"]] == [dead]
    dry = web.post("/api/dead-letters/discard", auth=auth, json={
        "reason": "r", "filter": {"provider": "payments"}, "dry_run": True}).json()
    assert dry["done"] == 1 and status_of(sessions, dead) == MessageStatus.DEAD
    refused = web.post("/api/dead-letters/redrive", auth=auth,
                       json={"reason": "r", "filter": {}})
    assert refused.status_code == 400 and "provider" in refused.json()["error"]
    gone = web.post("/api/dead-letters/discard", auth=auth, json={"reason": "r", "ids": [dead]})
    assert gone.json()["done"] == 1 and status_of(sessions, dead) == MessageStatus.DISCARDED


# ---- metrics and health -------------------------------------------------------------------

def _metrics(web) -> dict[str, dict[tuple, float]]:
    r = web.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return found


def _sum(samples: dict[tuple, float], **labels) -> float:
    return sum(v for k, v in samples.items() if set(labels.items()) <= set(k))


def test_metrics_agree_with_the_database_after_a_scripted_run(web, sessions, engine, provider,
                                                             sandbox):
    """5 delivered, 2 retried (503s), 1 dead (declined): the counters, gauges and histogram
    say so, before and after the attempts are rolled up into the totals."""
    delivered = [add(sessions, f"ok-{i}") for i in range(5)]
    for m in delivered:
        assert deliver(sessions, provider, m).outcome == "delivered"
    requests.post(sandbox.url + "/_sandbox/faults",
                  json={"fault": "error_before", "status": 503, "count": 2}).raise_for_status()
    retried = [add(sessions, f"retry-{i}") for i in range(2)]
    for m in retried:
        assert deliver(sessions, provider, m).outcome == "retry"
    make_dead(sessions, provider, sandbox, 1)

    def check():
        m = _metrics(web)
        attempts = m["outbox_attempts_total"]
        assert _sum(attempts, provider="payments", outcome="delivered") == 5
        assert _sum(attempts, provider="payments", outcome="retry", error_class="transient") == 2
        assert _sum(attempts, provider="payments", outcome="dead",
                    error_class="client_error") == 1
        codes = m["outbox_provider_responses_total"]
        assert (_sum(codes, status_code="200"), _sum(codes, status_code="503"),
                _sum(codes, status_code="402")) == (5, 2, 1)
        assert _sum(m["outbox_attempt_duration_seconds_count"], provider="payments") == 8
        assert _sum(m["outbox_attempt_duration_seconds_bucket"], provider="payments",
                    le="+Inf") == 8
        assert m["outbox_attempt_duration_seconds_sum"][
            (("operation", "charge"), ("provider", "payments"))] > 0
        messages = m["outbox_messages"]
        assert _sum(messages, provider="payments", status="delivered") == 5
        assert _sum(messages, provider="payments", status="pending") == 2
        assert _sum(messages, provider="payments", status="dead") == 1
        assert m["outbox_dead_letters"][(("provider", "payments"),)] == 1
        assert m["outbox_breaker_state"][(("provider", "payments"),)] == 0
        return m

    check()
    later = utcnow() + totals.SETTLE + timedelta(seconds=1)
    assert totals.roll_up(engine) == 0   # the first notes where the attempts end
    assert totals.roll_up(engine, now=later) == 8
    with sessions() as s:
        assert s.scalar(select(func.sum(AttemptTotal.count))) == 8
    check()
    # A new attempt lands in the tail: counted once, beside the totals.
    assert deliver(sessions, provider, add(sessions, "ok-late")).outcome == "delivered"
    assert _sum(_metrics(web)["outbox_attempts_total"], outcome="delivered") == 6


def test_health_levels_follow_the_thresholds(web, sessions, facts):
    assert web.get("/health/live").json() == {"status": "ok"}
    r = web.get("/health")
    assert r.status_code == 200 and r.json()["level"] == "ok"
    with sessions() as s:
        for i in range(100):
            enqueue(s, provider="payments", operation="charge",
                    payload={"amount": 1, "currency": "usd"}, idempotency_key=f"d{i}")
        s.commit()
    r = web.get("/health")
    body = r.json()
    assert r.status_code == 200 and body["level"] == "warning"
    assert body["providers"]["payments"]["findings"] == [
        {"check": "depth", "level": "warning", "reason": "queue depth 100 ≥ 100"}]
    facts["payments"]["protection"]["breaker"] = {"state": "open", "opened_at": 1.0}
    r = web.get("/health")
    assert r.status_code == 503 and r.json()["level"] == "critical"
    assert any(f["check"] == "breaker" and f["level"] == "critical"
               for f in r.json()["providers"]["payments"]["findings"])
    facts["payments"]["protection"]["breaker"] = {"state": "closed"}
    with sessions() as s:   # the backlog delivered
        s.execute(update(Message).values(status=MessageStatus.DELIVERED,
                                         delivered_at=utcnow()))
        s.commit()
    r = web.get("/health")
    assert r.status_code == 200 and r.json()["level"] == "ok"


@app_only
def test_health_follows_the_sandbox_fault_switches(sessions, facts, provider, sandbox):
    """Warning (declined cards: 2 % errors, 2 dead letters), critical (a 503 outage:
    11 % errors), ok again once the window has passed (the app's clock moved on)."""
    clock = {"shift": timedelta(0)}
    app = create_app(sessions, WebAuth.from_env(ENV), facts=lambda: facts,
                     operations=schemas.operations(), clock=lambda: utcnow() + clock["shift"])
    web = TestClient(app)

    def level():
        r = web.get("/health")
        body = r.json()
        assert r.status_code == (503 if body["level"] == "critical" else 200)
        return body["level"], [f["check"] for f in body["providers"]["payments"]["findings"]]

    for i in range(98):
        assert deliver(sessions, provider, add(sessions, f"fine-{i}")).outcome == "delivered"
    assert level() == ("ok", [])
    make_dead(sessions, provider, sandbox, 2)              # the declines switch
    assert level() == ("warning", ["error_rate", "dead_letters"])
    requests.post(sandbox.url + "/_sandbox/faults", json={   # the outage switch
        "fault": "error_before", "status": 503, "count": 10}, timeout=5).raise_for_status()
    for i in range(10):
        assert deliver(sessions, provider, add(sessions, f"outage-{i}")).outcome == "retry"
    assert level() == ("critical", ["error_rate", "dead_letters"])
    clock["shift"] = timedelta(hours=2)   # the faults switched off; the window passes
    assert level() == ("ok", [])


def test_a_slow_provider_trips_the_latency_check(web, sessions, facts, provider):
    facts["payments"]["latency_baseline_ms"] = 0.001   # any real call is far above it
    for i in range(10):
        assert deliver(sessions, provider, add(sessions, f"slow-{i}")).outcome == "delivered"
    found = web.get("/health").json()["providers"]["payments"]["findings"]
    assert [f["check"] for f in found] == ["latency"]
    assert found[0]["level"] == "critical" and "≥ 5 × baseline" in found[0]["reason"]


# ---- nothing sensitive anywhere -----------------------------------------------------------

@app_only
def test_no_secret_or_customer_datum_on_any_page_metric_or_api_answer(
        web, sessions, sandbox, monkeypatch):
    """A canary API key (wrong, so the provider refuses it: a dead letter with an auth
    error) and a canary customer and e-mail in the payload: none of them appears."""
    p = build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": sandbox.url,
                                    "OUTBOX_PAYMENTS_API_KEY": CANARY_KEY})
    try:
        m = add(sessions, "canary-order", customer=CANARY_CUSTOMER)
        with sessions() as s:
            s.get(Message, m).payload["metadata"] = {"email": CANARY_EMAIL}
        assert deliver(sessions, p, m).outcome == "dead"
    finally:
        p.close()
    token = login(web)
    auth = (USER, PASSWORD)
    answers = [web.get(path).text for path in (
        "/", "/dead-letters", f"/dead-letters?text={m}", f"/messages/{m}", "/audit",
        "/metrics", "/health")]
    answers += [web.get(f"/api/messages/{m}", auth=auth).text,
                web.get("/api/dead-letters", auth=auth).text,
                web.post("/dead-letters/preview", data={"csrf": token, "action": "redrive",
                                                        "reason": "r",
                                                        "provider": "payments"}).text]
    assert m in answers[3]   # the message page was really shown
    for text in answers:
        for canary in (CANARY_KEY, CANARY_CUSTOMER, CANARY_EMAIL, "CANARY"):
            assert canary not in text


# ---- bad input ----------------------------------------------------------------------------

@app_only
@pytest.mark.parametrize(("method", "path", "kwargs"), [
    ("get", "/dead-letters?page=abc", {}),
    ("get", "/dead-letters?page=99999999999999999999", {}),
    ("get", "/dead-letters?page=-1", {}),
    ("get", "/dead-letters?since=yesterday-ish", {}),
    ("get", "/dead-letters?text=" + "x" * 5000, {}),
    ("get", "/audit?page=1e9", {}),
    ("get", "/api/dead-letters?limit=0", {"auth": (USER, PASSWORD)}),
    ("get", "/api/dead-letters?limit=abc", {"auth": (USER, PASSWORD)}),
    ("get", "/api/dead-letters?offset=-5", {"auth": (USER, PASSWORD)}),
    ("get", "/api/dead-letters?since=%00", {"auth": (USER, PASSWORD)}),
    ("get", "/api/dead-letters?bogus=1", {"auth": (USER, PASSWORD)}),
    ("get", "/api/messages/" + "9" * 500, {"auth": (USER, PASSWORD)}),
    ("post", "/api/dead-letters/redrive", {"auth": (USER, PASSWORD), "content": b"{not json"}),
    ("post", "/api/dead-letters/redrive", {"auth": (USER, PASSWORD), "json": [1, 2]}),
    ("post", "/api/dead-letters/redrive", {"auth": (USER, PASSWORD),
                                           "json": {"reason": "", "ids": ["x"]}}),
    ("post", "/api/dead-letters/redrive", {"auth": (USER, PASSWORD),
                                           "json": {"reason": "r", "ids": "x"}}),
    ("post", "/api/dead-letters/redrive", {"auth": (USER, PASSWORD),
                                           "json": {"reason": "r", "ids": ["a"],
                                                    "filter": {"provider": "payments"}}}),
    ("post", "/api/dead-letters/discard", {"auth": (USER, PASSWORD),
                                           "json": {"reason": "r", "unknown": 1}}),
    ("post", "/api/dead-letters/discard", {"auth": (USER, PASSWORD),
                                           "content": b"x" * (2 * 1024 * 1024),
                                           "headers": {"content-type": "application/json"}}),
])
def test_bad_input_is_a_clear_4xx(web, method, path, kwargs):
    login(web)
    r = getattr(web, method)(path, **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if path.startswith("/api"):
        assert r.json()["error"] and "Traceback" not in r.text
    else:
        assert "Not done" in r.text


@app_only
def test_a_non_ascii_basic_credential_is_401_not_500(web):
    r = web.get("/api/dead-letters", headers={"Authorization": "Basic \u00e9".encode("latin-1")})
    assert r.status_code == 401

