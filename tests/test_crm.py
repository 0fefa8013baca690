"""The crm provider (issue 10 §1): OAuth2 with PKCE, tokens encrypted at rest, refreshed ahead
of expiry once for every worker, crash-safe refresh-token rotation, revocation, and the
HubSpot-shaped upsert verified after an ambiguous failure — against the sandbox's OAuth
server and CRM API on loopback, the real database and Redis.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import requests
import sqlalchemy as sa
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from sqlalchemy import select

import schemas
from integrations import crm, oauth, registry
from integrations.errors import CredentialUnavailable, Deferred
from outbox import Message, MessageStatus, enqueue, grants
from outbox.clock import utcnow
from outbox.models import Attempt, OAuthGrant
from tasks.delivery import deliver_message
from tests.harness import BIN, ROOT, free_port, wait_until
from web.admin import create_app
from web.auth import WebAuth

UPSERT = crm.UPSERT_PATH
CLIENT_ID = "outbox-test-client"
CANARY_SECRET = "cs-CANARY-5b1e0c7d9a2f4e68"   # the client secret: must never show up


def _sandbox(sandbox, path: str, body: dict | None = None) -> dict:
    answer = requests.post(f"{sandbox.url}/_sandbox/{path}", json=body or {}, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _crm_stats(sandbox) -> dict:
    return requests.get(f"{sandbox.url}/_sandbox/stats", timeout=5).json()["crm"]


@pytest.fixture
def crm_env(sandbox, db_url, redis_url, monkeypatch):
    """The crm provider pointed at the sandbox's OAuth server and CRM API, with a client
    secret the sandbox knows, a Fernet key and this test's database and Redis."""
    _sandbox(sandbox, "config", {"crm_client_id": CLIENT_ID, "crm_client_secret": CANARY_SECRET})
    env = {
        "DATABASE_URL": db_url, "REDIS_URL": redis_url,
        "OUTBOX_CRM_BASE_URL": sandbox.url,
        "OUTBOX_CRM_CLIENT_ID": CLIENT_ID, "OUTBOX_CRM_CLIENT_SECRET": CANARY_SECRET,
        "OUTBOX_CRM_AUTHORIZE_URL": f"{sandbox.url}/oauth/authorize",
        "OUTBOX_CRM_TOKEN_URL": f"{sandbox.url}/oauth/v1/token",
        "OUTBOX_CRM_REDIRECT_PORT": str(free_port()),
        "OUTBOX_CRM_RATE_LIMIT": "1000/s", "OUTBOX_CRM_VERIFY_AFTER": "0.2",
        "OUTBOX_CRM_TIMEOUT": "5",
        "OUTBOX_SECRET_KEY": Fernet.generate_key().decode(),
        "OUTBOX_HANDLERS": "",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _forget()
    yield env
    _forget()


def _forget() -> None:
    registry.reset()
    grants._default_store.cache_clear()


def _connect() -> oauth.Tokens:
    """What ``outbox crm connect`` does, in this process; the sandbox approves at once and a
    thread plays the browser that follows its redirect to the loopback listener."""
    settings = crm.oauth_settings()
    with oauth.CallbackListener(settings.redirect_port) as listener:
        started = oauth.start_authorization(settings)
        browser = threading.Thread(target=requests.get, args=(started.url,),
                                   kwargs={"timeout": 10})
        browser.start()
        callback = listener.wait(10)
        browser.join(10)
    tokens = oauth.finish_authorization(settings, started, callback, utcnow())
    grants._default_store().connect("crm", tokens)
    return tokens


def _contact(n: int, **properties) -> dict:
    return {"email": f"Person{n}@Example.com", "properties": {"firstname": f"P{n}", **properties}}


def _raw_rows(db_url: str, table: str) -> str:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return repr(conn.execute(sa.text(f"SELECT * FROM {table}")).fetchall())
    finally:
        engine.dispose()


# --- connecting -------------------------------------------------------------------------

def test_outbox_crm_connect_runs_the_code_flow_with_pkce_and_stores_tokens_encrypted(
        crm_env, sandbox, db_url):
    env = {**os.environ, **crm_env}
    proc = subprocess.Popen([str(BIN / "outbox"), "crm", "connect", "--timeout", "30"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = lines[1].strip()
        assert url.startswith(f"{sandbox.url}/oauth/authorize?"), lines
        assert "code_challenge_method=S256" in url and "state=" in url and "code_challenge=" in url
        assert CANARY_SECRET not in url
        page = requests.get(url, timeout=10)   # the sandbox approves; the redirect comes back
        assert page.status_code == 200 and "close this tab" in page.text
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "crm connected" in out and err == ""

    raw = _raw_rows(db_url, "outbox_oauth_grants")
    grant = grants._default_store().load("crm")
    assert grant.status == "active" and grant.tokens.refresh_token
    for token in (grant.tokens.access_token, grant.tokens.refresh_token):
        assert token not in raw
    assert "sbx-" not in raw   # the sandbox's token prefixes: nothing in clear

    delivery = registry.get_provider("crm").deliver("upsert_contact", _contact(1), "k1")
    assert delivery.summary.endswith("created")
    assert _crm_stats(sandbox)["contacts"] == 1


def test_connect_refuses_a_forged_callback_state(crm_env):
    env = {**os.environ, **crm_env}
    port = crm_env["OUTBOX_CRM_REDIRECT_PORT"]
    proc = subprocess.Popen([str(BIN / "outbox"), "crm", "connect", "--timeout", "30"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        proc.stdout.readline(), proc.stdout.readline()
        forged = f"http://127.0.0.1:{port}{oauth.CALLBACK_PATH}?code=stolen&state=guess"
        assert requests.get(forged, timeout=10).status_code == 200
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert "state does not match" in err and len(err.strip().splitlines()) == 1
    assert grants._default_store().load("crm") is None


def test_a_denied_authorisation_stores_nothing(crm_env, sandbox):
    _sandbox(sandbox, "config", {"crm_deny_authorization": True})
    with pytest.raises(ValueError, match="authorisation refused: access_denied"):
        _connect()
    assert grants._default_store().load("crm") is None


def test_without_a_grant_crm_messages_wait_and_health_says_reauthorise(crm_env):
    with pytest.raises(CredentialUnavailable, match="re-authorisation required: crm is not "
                                                    "connected; run outbox crm connect"):
        registry.get_provider("crm").deliver("upsert_contact", _contact(1), "k1")
    check = registry.check_provider("crm")
    assert check.reauthorize and "re-authorisation required" in check.credential_error


# --- refresh ------------------------------------------------------------------------------

_HAMMER = """
import sys, time
import outbox
from integrations.registry import get_provider
start, until, n = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
provider = get_provider("crm")
provider.deliver("upsert_contact", {"email": f"warm{n}@example.com"}, f"warm-{n}")
time.sleep(max(0.0, start - time.time()))
done = 0
while time.time() < until:
    provider.deliver("upsert_contact", {"email": f"w{n}-{done}@example.com"}, f"w{n}-{done}")
    done += 1
print(done)
"""


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_four_worker_processes_at_expiry_make_exactly_one_refresh(crm_env, sandbox):
    """Four processes deliver through the moment the token is due (80 % of its 12 s life)
    and past its expiry: one refresh for all of them, and no request with an expired
    token reaches the provider."""
    _sandbox(sandbox, "config", {"crm_access_token_ttl_s": 12})
    _connect()
    issued = time.time()
    env = {**os.environ, **crm_env}
    hammers = [subprocess.Popen([sys.executable, "-c", _HAMMER, str(issued + 9.0),
                                 str(issued + 13.5), str(n)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for n in range(4)]
    outputs = [h.communicate(timeout=60) for h in hammers]
    for hammer, (out, err) in zip(hammers, outputs, strict=True):
        assert hammer.returncode == 0, err[-2000:]
        assert int(out) > 5   # each delivered all along, before and after the refresh
    stats = _crm_stats(sandbox)
    # One redemption of the refresh token in all: not one each answered by grace replays.
    assert stats["token_requests"]["refresh_token"] == 1
    assert stats["refreshes"] == 1 and stats["refresh_replays"] == 0
    assert stats["requests_with_expired_token"] == 0
    assert stats["refresh_reuse_detected"] == 0
    assert grants._default_store().load("crm").version == 2   # connected, refreshed once


_CRASH_AFTER_ANSWER = """
import os
import outbox
from outbox import grants
from integrations.registry import get_provider
grants.DatabaseGrants.save_refreshed = lambda *args, **kwargs: os._exit(9)
get_provider("crm").client.credentials.refresh()   # a 401's forced refresh: dies on saving
"""


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_crash_between_receiving_and_saving_a_rotated_token_does_not_lock_out(
        crm_env, sandbox):
    _connect()
    env = {**os.environ, **crm_env}
    crashed = subprocess.run([sys.executable, "-c", _CRASH_AFTER_ANSWER], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert crashed.returncode == 9, crashed.stderr[-2000:]
    assert _crm_stats(sandbox)["refreshes"] == 1    # the server rotated: the old RT is spent
    stored = grants._default_store().load("crm")
    assert stored.version == 1 and stored.refresh_started_at is not None

    provider = registry.get_provider("crm")
    provider.deliver("upsert_contact", _contact(1), "k1")   # the old access token still works
    # No traffic now: the relay's keeper finds the interrupted refresh once the dead worker's
    # lock lapses (lock_s), and redeems the same refresh token again inside the server's
    # grace window: the same rotated pair comes back.
    stop = threading.Event()
    oauth.keep_fresh(lambda: [provider.client.credentials], stop, interval_s=0.5)
    try:
        wait_until(lambda: grants._default_store().load("crm").version == 2, 30,
                   interval_s=0.5, message="the interrupted refresh to be redone")
    finally:
        stop.set()
    stats = _crm_stats(sandbox)
    assert stats["refresh_replays"] == 1 and stats["refresh_reuse_detected"] == 0
    grant = grants._default_store().load("crm")
    assert grant.status == "active" and grant.refresh_started_at is None
    provider.deliver("upsert_contact", _contact(999), "after")   # the new token works
    assert _crm_stats(sandbox)["requests_with_revoked_token"] == 0


def test_a_401_refreshes_once_and_retries(crm_env, sandbox):
    _connect()
    provider = registry.get_provider("crm")
    provider.deliver("upsert_contact", _contact(1), "k1")
    # The token stops working before its time (e.g. rotated by an admin): one refresh, one retry.
    _sandbox(sandbox, "faults", {"fault": "status", "status": 401, "count": 1, "path": UPSERT,
                                 "body": {"status": "error", "message": "expired",
                                          "category": "EXPIRED_AUTHENTICATION"}})
    delivery = provider.deliver("upsert_contact", _contact(1, lastname="L"), "k2")
    assert delivery.summary.endswith("updated")
    assert _crm_stats(sandbox)["refreshes"] == 1


def test_threads_refused_together_refresh_once(crm_env, sandbox):
    """Four threads of one worker get a 401 for the same token: one refresh, and each
    retries with the new token."""
    _connect()
    provider = registry.get_provider("crm")
    provider.deliver("upsert_contact", _contact(0), "k0")
    _sandbox(sandbox, "faults", {"fault": "status", "status": 401, "count": 4, "path": UPSERT,
                                 "body": {"status": "error", "message": "expired",
                                          "category": "EXPIRED_AUTHENTICATION"}})
    start = threading.Barrier(4)
    errors = []

    def deliver(n):
        start.wait()
        try:
            provider.deliver("upsert_contact", _contact(n), f"k{n}")
        except Exception as exc:   # noqa: BLE001  (reported below)
            errors.append(exc)
    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    stats = _crm_stats(sandbox)
    assert stats["token_requests"]["refresh_token"] == 1 and stats["refreshes"] == 1


def test_a_401_while_the_token_endpoint_is_down_waits_instead_of_failing(crm_env, sandbox):
    _connect()
    provider = registry.get_provider("crm")
    _sandbox(sandbox, "faults", {"fault": "status", "status": 401, "count": 1, "path": UPSERT})
    _sandbox(sandbox, "faults", {"fault": "error_before", "status": 503, "count": 1,
                                 "path": "/oauth/v1/token"})
    with pytest.raises(Deferred) as refused:   # not an AuthError: that would dead-letter
        provider.deliver("upsert_contact", _contact(1), "k1")
    assert refused.value.code == oauth.REFRESH_FAILED
    assert grants._default_store().load("crm").status == "active"


def test_hubspots_own_refusal_of_the_refresh_token_means_reauthorise(crm_env, sandbox):
    """HubSpot refuses a dead refresh token with 400 {"status": "BAD_REFRESH_TOKEN"}, not
    RFC 6749's invalid_grant: the grant is revoked all the same, not retried forever."""
    _connect()
    _sandbox(sandbox, "faults", {"fault": "status", "status": 400, "count": 1,
                                 "path": "/oauth/v1/token",
                                 "body": {"status": "BAD_REFRESH_TOKEN",
                                          "message": "missing or unknown refresh token"}})
    with pytest.raises(CredentialUnavailable, match="re-authorisation required"):
        registry.get_provider("crm").client.credentials.refresh()
    assert grants._default_store().load("crm").status == "revoked"


def test_the_callback_listener_outlasts_a_connection_that_sends_nothing():
    """A browser may open a connection it never uses (a preconnect): the listener drops it
    and still takes the real callback."""
    port = free_port()
    with oauth.CallbackListener(port) as listener:
        idle = socket.create_connection(("127.0.0.1", port))
        url = f"http://127.0.0.1:{port}{oauth.CALLBACK_PATH}?code=c&state=s"
        threading.Timer(0.3, requests.get, args=(url,), kwargs={"timeout": 15}).start()
        started = time.monotonic()
        assert listener.wait(20) == url
        assert time.monotonic() - started < 10
        idle.close()


# --- revocation: real worker and relay ---------------------------------------------------------

def _crm_messages(sessions) -> list[Message]:
    with sessions() as session:
        return list(session.scalars(select(Message).where(Message.provider == "crm")
                                    .order_by(Message.created_at)))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_revocation_defers_without_spending_attempts_and_connect_resumes_them(
        crm_env, sandbox, procs, sessions, celery_publisher):
    _connect()
    procs.worker(queues="crm,dead_letter", **crm_env)
    procs.relay(**crm_env)
    with sessions() as session:
        enqueue(session, provider="crm", operation="upsert_contact", payload=_contact(0),
                idempotency_key="before")
        session.commit()
    wait_until(lambda: _crm_messages(sessions)[0].status == MessageStatus.DELIVERED, 30)

    assert _sandbox(sandbox, "oauth/revoke")["revoked_grants"] >= 1
    with sessions() as session:
        for n in range(1, 4):
            enqueue(session, provider="crm", operation="upsert_contact", payload=_contact(n),
                    idempotency_key=f"while-revoked-{n}")
        session.commit()

    def all_deferred():
        waiting = _crm_messages(sessions)[1:]
        return all(m.status == MessageStatus.PENDING and m.last_error_class == "deferred"
                   for m in waiting)
    wait_until(all_deferred, 30, message="the crm messages to be deferred")
    waiting = _crm_messages(sessions)[1:]
    assert [m.attempts for m in waiting] == [0, 0, 0]
    assert all("re-authorisation required" in m.last_error for m in waiting)
    grant = grants._default_store().load("crm")
    assert grant.status == "revoked"

    status = subprocess.run([str(BIN / "outbox"), "status"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, **crm_env}, timeout=60)
    assert status.returncode == 2, status.stdout + status.stderr
    assert "re-authorisation required" in status.stdout

    _connect()
    assert grants.resume(sessions, "crm") == 3
    wait_until(lambda: all(m.status == MessageStatus.DELIVERED for m in _crm_messages(sessions)),
               30, message="the waiting crm messages to go out after connecting")
    assert [m.attempts for m in _crm_messages(sessions)] == [1, 1, 1, 1]
    assert _crm_stats(sandbox)["requests_with_expired_token"] == 0


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_relay_refreshes_an_idle_grant_before_it_expires(crm_env, sandbox, procs):
    """No crm message at all: the relay's keeper still refreshes the token at 80 % of its
    life, so the first message after a quiet hour finds a fresh one."""
    _sandbox(sandbox, "config", {"crm_access_token_ttl_s": 6})
    _connect()
    procs.relay(**crm_env)
    wait_until(lambda: grants._default_store().load("crm").version >= 2, 30,
               message="the relay to refresh the idle grant")
    stats = _crm_stats(sandbox)
    assert stats["refreshes"] >= 1 and stats["refresh_reuse_detected"] == 0


# --- ambiguous failures: verified by reading the contact back --------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("fault, effects", [("error_after", 1), ("error_before", 0)])
def test_an_ambiguous_upsert_is_verified_before_it_is_sent_again(crm_env, sandbox, sessions,
                                                                  fault, effects):
    _connect()
    _sandbox(sandbox, "faults", {"fault": fault, "status": 500, "count": 1, "path": UPSERT})
    with sessions() as session:
        message = enqueue(session, provider="crm", operation="upsert_contact",
                          payload=_contact(7, lastname="Seven"), idempotency_key="ambiguous")
        session.commit()
        message_id = message.id
    first = deliver_message(message_id, sessions=sessions, lease=timedelta(seconds=60),
                            provider_for=registry.get_provider)
    assert first.outcome.value == "retry"
    time.sleep(0.3)   # OUTBOX_CRM_VERIFY_AFTER
    with sessions.begin() as session:
        session.get(Message, message_id).next_attempt_at = utcnow()
    second = deliver_message(message_id, sessions=sessions, lease=timedelta(seconds=60),
                             provider_for=registry.get_provider)
    assert second.outcome.value == "delivered", second.summary
    assert ("verified: the last attempt took effect" in second.summary) == (effects == 1)
    with sessions() as session:
        row = session.get(Message, message_id)
        assert not row.needs_review
        assert session.scalar(select(sa.func.count()).select_from(Attempt)
                              .where(Attempt.message_id == message_id)) == 2
    stats = requests.get(f"{sandbox.url}/_sandbox/stats", timeout=5).json()
    assert stats["effects_by_key"] == {"person7@example.com": 1}   # one contact, made once
    upserts = [e for e in stats["request_log"] if e["path"] == UPSERT]
    assert len(upserts) == 2 - effects   # sent again only when it had not taken effect


# --- secrets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_rotating_the_secret_key_keeps_the_tokens_working(crm_env, sandbox, db_url, monkeypatch):
    old = crm_env["OUTBOX_SECRET_KEY"]
    _connect()
    raw_before = _raw_rows(db_url, "outbox_oauth_grants")
    new = Fernet.generate_key().decode()
    env = {**os.environ, **crm_env, "OUTBOX_SECRET_KEY": f"{new},{old}"}
    done = subprocess.run([str(BIN / "outbox"), "secrets", "rotate", "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outbox_oauth_grants"] == 2   # access and refresh token
    assert _raw_rows(db_url, "outbox_oauth_grants") != raw_before

    monkeypatch.setenv("OUTBOX_SECRET_KEY", new)   # the old key dropped
    _forget()
    registry.get_provider("crm").deliver("upsert_contact", _contact(1), "k1")

    monkeypatch.setenv("OUTBOX_SECRET_KEY", Fernet.generate_key().decode())   # a wrong key
    _forget()
    check = registry.check_provider("crm")
    assert "cannot be decrypted" in check.credential_error


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_canary_tokens_and_client_secret_appear_nowhere_but_the_encrypted_column(
        crm_env, sandbox, procs, sessions, celery_publisher, client, db_url):
    """The client secret and the access and refresh tokens (the sandbox's, read back by
    decrypting the grant) never show in worker logs (DEBUG), the broker and Redis, Flower,
    the admin page and API, or the database outside the encrypted token columns."""
    _sandbox(sandbox, "config", {"crm_access_token_ttl_s": 6})
    _connect()
    procs.worker(queues="crm,dead_letter", OUTBOX_LOG_LEVEL="DEBUG", **crm_env)
    procs.relay(**crm_env)
    flower = procs.flower("admin", "flower-pass-1")
    with sessions() as session:
        for n in range(6):
            enqueue(session, provider="crm", operation="upsert_contact", payload=_contact(n),
                    idempotency_key=f"canary-{n}")
        session.commit()
    wait_until(lambda: all(m.status == MessageStatus.DELIVERED
                           for m in _crm_messages(sessions)), 30)
    time.sleep(5)   # past 80 % of the 6 s token: the next delivery refreshes
    with sessions() as session:
        enqueue(session, provider="crm", operation="upsert_contact", payload=_contact(99),
                idempotency_key="canary-after-refresh")
        session.commit()
    wait_until(lambda: all(m.status == MessageStatus.DELIVERED
                           for m in _crm_messages(sessions)), 30)
    assert _crm_stats(sandbox)["refreshes"] >= 1
    grant = grants._default_store().load("crm")
    canaries = {CANARY_SECRET, grant.tokens.access_token, grant.tokens.refresh_token}

    places = {"worker log": procs.log("w1"), "relay log": procs.log("relay")}
    tasks = requests.get(f"{flower}/api/tasks", auth=("admin", "flower-pass-1"), timeout=10)
    assert tasks.status_code == 200 and len(tasks.json()) >= 7   # the deliveries were seen
    places["flower"] = tasks.text
    places["flower log"] = procs.log("flower")
    places["redis"] = repr([(k, client.dump(k)) for k in client.keys("*")])
    with sessions() as session:
        row = session.get(OAuthGrant, "crm")
        row.access_token = row.refresh_token = "(encrypted column)"
        session.expunge(row)   # read, not written back
        places["grant row"] = repr(row.__dict__)
    for table in ("outbox_messages", "outbox_attempts", "outbox_audit"):
        places[table] = _raw_rows(db_url, table)
    app = create_app(sessions, WebAuth.from_env({"OUTBOX_WEB_AUTH": "admin:correct-horse-9"}),
                     facts=registry.provider_facts, operations=schemas.operations())
    first = _crm_messages(sessions)[0].id
    with TestClient(app) as web:
        token = re.search(r'name="csrf" value="([^"]+)"', web.get("/login").text)[1]
        assert web.post("/login", data={"username": "admin", "password": "correct-horse-9",
                                        "csrf": token, "next": "/"},
                        follow_redirects=False).status_code == 303
        for path in ("/", "/dead-letters", "/audit", "/metrics", "/health",
                     f"/messages/{first}"):
            places[path] = web.get(path).text
        places["api"] = web.get(f"/api/messages/{first}",
                                auth=("admin", "correct-horse-9")).text
    assert first in places[f"/messages/{first}"]   # the pages were really shown
    for place, text in places.items():
        for canary in canaries:
            assert canary not in text, f"a secret in {place}"
