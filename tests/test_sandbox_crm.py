"""The sandbox's HubSpot-shaped CRM and its OAuth2 server over real loopback HTTP: the code
flow with PKCE driven by authlib, refresh-token rotation (grace replay, reuse detection),
revocation, expiry, the contacts API, faults in HubSpot's shape and the crm stats."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session

ROOT = Path(__file__).resolve().parents[1]
CLIENT_ID, SECRET = "outbox-demo-client", "outbox-demo-secret-0123456789"
REDIRECT = "http://127.0.0.1:8765/callback"
SCOPE = "crm.objects.contacts.read crm.objects.contacts.write"
UPSERT = "/crm/v3/objects/contacts/batch/upsert"
CONTACT = {"idProperty": "email", "id": "Ann@Example.com", "properties": {"firstname": "Ann"}}


def config(sandbox, **settings):
    r = requests.post(sandbox.url + "/_sandbox/config", json=settings, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def crm_stats(sandbox):
    return requests.get(sandbox.url + "/_sandbox/stats?log=0", timeout=5).json()["crm"]


def session(**kw):
    return OAuth2Session(CLIENT_ID, SECRET, scope=SCOPE, redirect_uri=REDIRECT,
                         code_challenge_method="S256",
                         token_endpoint_auth_method="client_secret_post", **kw)


def authorize(sandbox, client, **params):
    """Run the authorize step; returns (302 Location, code verifier, state sent)."""
    verifier = generate_token(48)
    url, state = client.create_authorization_url(sandbox.url + "/oauth/authorize",
                                                 code_verifier=verifier, **params)
    r = requests.get(url, allow_redirects=False, timeout=5)
    assert r.status_code == 302, r.text
    return r.headers["Location"], verifier, state


def query_of(location):
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))


def connect(sandbox):
    """authorize + fetch_token; returns (authlib session, token dict, verifier, location)."""
    client = session()
    location, verifier, state = authorize(sandbox, client)
    token = client.fetch_token(sandbox.url + "/oauth/v1/token", authorization_response=location,
                               state=state, code_verifier=verifier)
    return client, token, verifier, location


def token_request(sandbox, auth=None, **form):
    if auth is None:
        form = {"client_id": CLIENT_ID, "client_secret": SECRET, **form}
    return requests.post(sandbox.url + "/oauth/v1/token", data=form, auth=auth, timeout=5)


def refresh(sandbox, refresh_token):
    return token_request(sandbox, grant_type="refresh_token", refresh_token=refresh_token)


def api(sandbox, method, path, access_token, **kw):
    return requests.request(method, sandbox.url + path, timeout=5,
                            headers={"Authorization": f"Bearer {access_token}"}, **kw)


def upsert(sandbox, access_token, *inputs):
    return api(sandbox, "POST", UPSERT, access_token, json={"inputs": list(inputs)})


def assert_hubspot_error(r, status, category):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == "error" and body["category"] == category
    assert body["message"] and body["correlationId"]
    return body


# --- the code flow -------------------------------------------------------------------------

def test_code_flow_with_pkce_then_the_api_then_a_refresh(sandbox):
    client = session()
    location, verifier, state = authorize(sandbox, client)
    assert location.startswith(REDIRECT + "?code=")
    assert query_of(location)["state"] == state
    token = client.fetch_token(sandbox.url + "/oauth/v1/token", authorization_response=location,
                               state=state, code_verifier=verifier)
    assert token["token_type"] == "bearer" and token["expires_in"] == 1800
    assert token["access_token"].startswith("sbx-at-")
    assert token["refresh_token"].startswith("sbx-rt-")
    assert token["scope"] == SCOPE

    r = client.post(sandbox.url + UPSERT, json={"inputs": [CONTACT]}, timeout=5)
    assert r.status_code == 200 and r.json()["results"][0]["new"] is True
    assert client.get(sandbox.url + "/crm/v3/objects/contacts?limit=1", timeout=5).ok

    old = dict(token)
    new = client.refresh_token(sandbox.url + "/oauth/v1/token")
    assert new["access_token"] != old["access_token"]
    assert new["refresh_token"] != old["refresh_token"]
    r = client.get(sandbox.url + "/crm/v3/objects/contacts/ann@example.com",
                   params={"idProperty": "email"}, timeout=5)
    assert r.status_code == 200 and r.request.headers["Authorization"].endswith(
        new["access_token"])
    s = crm_stats(sandbox)
    assert s["token_requests"] == {"authorization_code": 1, "refresh_token": 1, "other": 0}
    assert (s["authorizations"], s["refreshes"], s["contacts"]) == (1, 1, 1)
    assert s["refresh_replays"] == s["refresh_reuse_detected"] == 0
    assert s["requests_with_expired_token"] == s["requests_with_revoked_token"] == 0


def test_token_answers_are_not_cached_and_basic_auth_works(sandbox):
    client = session()
    location, verifier, _ = authorize(sandbox, client)
    r = token_request(sandbox, auth=(CLIENT_ID, SECRET), grant_type="authorization_code",
                      code=query_of(location)["code"], redirect_uri=REDIRECT,
                      code_verifier=verifier)
    assert r.status_code == 200, r.text
    assert r.headers["Cache-Control"] == "no-store"
    assert set(r.json()) == {"token_type", "access_token", "refresh_token", "expires_in",
                             "scope"}


def test_the_redirect_keeps_the_query_and_echoes_the_state_exactly(sandbox):
    redirect = "http://localhost:9/cb?x=1&y=a+b"
    client = session()
    state = "a b&c=d/é?#+%"
    location, _, _ = authorize(sandbox, client, redirect_uri=redirect, state=state)
    assert location.startswith(redirect + "&code=")
    assert query_of(location)["state"] == state and query_of(location)["x"] == "1"
    location, _, _ = authorize(sandbox, client, redirect_uri="http://[::1]:9/cb")
    assert location.startswith("http://[::1]:9/cb?code=")


@pytest.mark.parametrize("change", [
    {"client_id": "someone-else"},
    {"redirect_uri": "https://127.0.0.1:9/cb"},
    {"redirect_uri": "http://example.com:9/cb"},
    {"redirect_uri": "http://127.0.0.1/cb"},          # no port
    {"redirect_uri": "http://127.0.0.1:9/cb#frag"},
    {"redirect_uri": "http://u@127.0.0.1:9/cb"},
    {"redirect_uri": None},
    {"response_type": "token"},
])
def test_authorize_refuses_without_redirecting(sandbox, change):
    params = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT,
              "state": "s1", "code_challenge": "x" * 43, "code_challenge_method": "S256"}
    params.update(change)
    params = {k: v for k, v in params.items() if v is not None}
    r = requests.get(sandbox.url + "/oauth/authorize", params=params, allow_redirects=False,
                     timeout=5)
    assert r.status_code == 400 and "Location" not in r.headers
    assert r.json()["error"] in ("invalid_request", "unsupported_response_type")
    assert crm_stats(sandbox)["authorizations"] == 0


@pytest.mark.parametrize("change, echoed", [
    ({"code_challenge": None}, True),
    ({"code_challenge_method": None}, True),
    ({"code_challenge_method": "plain"}, True),
    ({"code_challenge": "too-short"}, True),
    ({"state": None}, False),
])
def test_missing_pkce_or_state_redirects_with_invalid_request(sandbox, change, echoed):
    params = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT,
              "state": "s1", "code_challenge": "x" * 43, "code_challenge_method": "S256"}
    params.update(change)
    params = {k: v for k, v in params.items() if v is not None}
    r = requests.get(sandbox.url + "/oauth/authorize", params=params, allow_redirects=False,
                     timeout=5)
    assert r.status_code == 302 and r.headers["Location"].startswith(REDIRECT + "?")
    answer = query_of(r.headers["Location"])
    assert answer["error"] == "invalid_request" and answer["error_description"]
    assert "code" not in answer and (answer.get("state") == "s1") is echoed


def test_the_deny_switch_redirects_with_access_denied(sandbox):
    assert config(sandbox, crm_deny_authorization=True)["crm_deny_authorization"] is True
    location, _, state = authorize(sandbox, session())
    answer = query_of(location)
    assert (answer["error"], answer["state"]) == ("access_denied", state)
    assert "code" not in answer


# --- token endpoint errors -----------------------------------------------------------------

def test_a_wrong_verifier_is_invalid_grant(sandbox):
    client = session()
    location, _, state = authorize(sandbox, client)
    with pytest.raises(OAuthError) as caught:
        client.fetch_token(sandbox.url + "/oauth/v1/token", authorization_response=location,
                           state=state, code_verifier=generate_token(48))
    assert caught.value.error == "invalid_grant"


def test_a_wrong_redirect_uri_or_an_expired_code_is_invalid_grant(sandbox):
    client = session()
    location, verifier, _ = authorize(sandbox, client)
    r = token_request(sandbox, grant_type="authorization_code", code=query_of(location)["code"],
                      redirect_uri="http://127.0.0.1:8765/other", code_verifier=verifier)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    config(sandbox, crm_auth_code_ttl_s=5)
    location, verifier, _ = authorize(sandbox, client)
    config(sandbox, advance_clock_s=6)
    r = token_request(sandbox, grant_type="authorization_code", code=query_of(location)["code"],
                      redirect_uri=REDIRECT, code_verifier=verifier)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert "expired" in r.json()["error_description"]


def test_a_reused_code_is_refused_and_revokes_its_tokens(sandbox):
    client, token, verifier, location = connect(sandbox)
    r = token_request(sandbox, grant_type="authorization_code", code=query_of(location)["code"],
                      redirect_uri=REDIRECT, code_verifier=verifier)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert_hubspot_error(upsert(sandbox, token["access_token"], CONTACT), 401,
                         "INVALID_AUTHENTICATION")
    r = refresh(sandbox, token["refresh_token"])
    assert r.json() == {"error": "invalid_grant", "error_description": "refresh token revoked"}
    assert crm_stats(sandbox)["requests_with_revoked_token"] == 1


@pytest.mark.parametrize("auth, form", [
    (None, {"client_secret": "wrong"}),
    (None, {"client_id": "someone-else"}),
    (None, {"client_secret": None}),
    ((CLIENT_ID, "wrong"), {}),
    (("someone-else", SECRET), {}),
])
def test_a_bad_client_is_401_invalid_client(sandbox, auth, form):
    data = {"grant_type": "refresh_token", "refresh_token": "sbx-rt-x"}
    if auth is None:
        data.update({"client_id": CLIENT_ID, "client_secret": SECRET, **form})
    data = {k: v for k, v in data.items() if v is not None}
    r = requests.post(sandbox.url + "/oauth/v1/token", data=data, auth=auth, timeout=5)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    assert r.json()["error_description"]


@pytest.mark.parametrize("form, error", [
    ({"grant_type": "password", "username": "u", "password": "p"}, "unsupported_grant_type"),
    ({}, "invalid_request"),
    ({"grant_type": "refresh_token"}, "invalid_request"),
    ({"grant_type": "authorization_code", "code": "c", "redirect_uri": REDIRECT},
     "invalid_request"),
    ({"grant_type": "refresh_token", "refresh_token": "sbx-rt-unknown"}, "invalid_grant"),
])
def test_token_request_errors(sandbox, form, error):
    r = token_request(sandbox, **form)
    assert (r.status_code, r.json()["error"]) == (400, error)


# --- refresh rotation ----------------------------------------------------------------------

def test_a_replay_within_the_grace_gets_the_same_pair_and_reuse_after_it_revokes_all(sandbox):
    _, token, _, _ = connect(sandbox)
    first = refresh(sandbox, token["refresh_token"])
    assert first.status_code == 200
    replay = refresh(sandbox, token["refresh_token"])
    assert replay.status_code == 200 and replay.json() == first.json()
    s = crm_stats(sandbox)
    assert (s["refreshes"], s["refresh_replays"], s["refresh_reuse_detected"]) == (1, 1, 0)
    assert upsert(sandbox, first.json()["access_token"], CONTACT).status_code == 200

    config(sandbox, advance_clock_s=31)
    r = refresh(sandbox, token["refresh_token"])
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_grant",
                        "error_description": "refresh token reuse detected"}
    assert_hubspot_error(upsert(sandbox, first.json()["access_token"], CONTACT), 401,
                         "INVALID_AUTHENTICATION")
    r = refresh(sandbox, first.json()["refresh_token"])
    assert r.json()["error_description"] == "refresh token revoked"
    s = crm_stats(sandbox)
    assert (s["refresh_reuse_detected"], s["requests_with_revoked_token"]) == (1, 1)


def test_an_older_refresh_token_of_the_family_is_reuse_even_within_the_grace(sandbox):
    _, token, _, _ = connect(sandbox)
    second = refresh(sandbox, token["refresh_token"]).json()
    third = refresh(sandbox, second["refresh_token"]).json()
    r = refresh(sandbox, token["refresh_token"])
    assert r.json()["error_description"] == "refresh token reuse detected"
    assert_hubspot_error(upsert(sandbox, third["access_token"], CONTACT), 401,
                         "INVALID_AUTHENTICATION")


def test_concurrent_refreshes_with_one_token_all_get_the_same_pair(sandbox):
    _, token, _, _ = connect(sandbox)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: refresh(sandbox, token["refresh_token"]), range(8)))
    assert {r.status_code for r in answers} == {200}
    assert len({r.text for r in answers}) == 1
    s = crm_stats(sandbox)
    assert (s["refreshes"], s["refresh_replays"], s["refresh_reuse_detected"]) == (1, 7, 0)


def test_a_lost_refresh_answer_is_recovered_by_the_grace_replay(sandbox):
    _, token, _, _ = connect(sandbox)
    requests.post(sandbox.url + "/_sandbox/faults", json={
        "fault": "error_after", "path": "/oauth/v1/token", "count": 1}, timeout=5)
    lost = refresh(sandbox, token["refresh_token"])
    assert_hubspot_error(lost, 500, "INTERNAL_ERROR")
    again = refresh(sandbox, token["refresh_token"])
    assert again.status_code == 200
    assert upsert(sandbox, again.json()["access_token"], CONTACT).status_code == 200
    s = crm_stats(sandbox)
    assert (s["refreshes"], s["refresh_replays"], s["refresh_reuse_detected"]) == (1, 1, 0)


def test_an_expired_access_token_is_401_expired_and_counted(sandbox):
    config(sandbox, crm_access_token_ttl_s=60)
    client, token, _, _ = connect(sandbox)
    assert token["expires_in"] == 60
    config(sandbox, advance_clock_s=61)
    body = assert_hubspot_error(upsert(sandbox, token["access_token"], CONTACT), 401,
                                "EXPIRED_AUTHENTICATION")
    assert "expired" in body["message"]
    assert crm_stats(sandbox)["requests_with_expired_token"] == 1
    new = client.refresh_token(sandbox.url + "/oauth/v1/token")
    assert upsert(sandbox, new["access_token"], CONTACT).status_code == 200
    assert crm_stats(sandbox)["requests_with_expired_token"] == 1


def test_the_revoke_control_ends_every_grant(sandbox):
    _, token, _, _ = connect(sandbox)
    r = requests.post(sandbox.url + "/_sandbox/oauth/revoke", timeout=5)
    assert r.status_code == 200 and r.json() == {"revoked_grants": 1}
    r = refresh(sandbox, token["refresh_token"])
    assert r.json() == {"error": "invalid_grant", "error_description": "refresh token revoked"}
    assert_hubspot_error(upsert(sandbox, token["access_token"], CONTACT), 401,
                         "INVALID_AUTHENTICATION")
    assert crm_stats(sandbox)["requests_with_revoked_token"] == 1


@pytest.mark.parametrize("header", [None, "Bearer sbx-at-unknown", "Basic eDp5"])
def test_missing_or_unknown_tokens_are_401_invalid_and_not_counted(sandbox, header):
    headers = {"Authorization": header} if header else {}
    r = requests.get(sandbox.url + "/crm/v3/objects/contacts?limit=1", headers=headers,
                     timeout=5)
    assert_hubspot_error(r, 401, "INVALID_AUTHENTICATION")
    s = crm_stats(sandbox)
    assert s["requests_with_expired_token"] == s["requests_with_revoked_token"] == 0


# --- contacts ------------------------------------------------------------------------------

@pytest.fixture
def access_token(sandbox):
    return connect(sandbox)[1]["access_token"]


def test_upsert_creates_then_updates_one_contact(sandbox, access_token):
    r = upsert(sandbox, access_token, CONTACT)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "COMPLETE" and body["startedAt"] and body["completedAt"]
    created = body["results"][0]
    assert created["new"] is True and created["id"].isdigit()
    assert created["properties"]["email"] == "ann@example.com"
    assert created["properties"]["firstname"] == "Ann"
    assert created["properties"]["hs_object_id"] == created["id"]
    assert created["createdAt"].endswith("Z") and created["updatedAt"]

    same = upsert(sandbox, access_token, {**CONTACT, "id": "ANN@example.com"}).json()
    assert same["results"][0]["new"] is False and same["results"][0]["id"] == created["id"]
    changed = upsert(sandbox, access_token,
                     {**CONTACT, "properties": {"lastname": "Lee"}}).json()["results"][0]
    assert changed["new"] is False
    assert changed["properties"]["firstname"] == "Ann"
    assert changed["properties"]["lastname"] == "Lee"
    stats = requests.get(sandbox.url + "/_sandbox/stats?log=0", timeout=5).json()
    assert stats["effects_by_key"] == {"ann@example.com": 2}   # the no-op upsert: no effect
    assert stats["requests_by_key"]["ann@example.com"] == 3
    assert stats["crm"]["contacts"] == 1


def test_get_by_email_by_id_404_and_the_list(sandbox, access_token):
    created = upsert(sandbox, access_token, CONTACT).json()["results"][0]
    r = api(sandbox, "GET", "/crm/v3/objects/contacts/ANN%40example.com?idProperty=email",
            access_token)
    assert r.status_code == 200
    assert set(r.json()) == {"id", "properties", "createdAt", "updatedAt", "archived"}
    assert r.json()["id"] == created["id"] and r.json()["archived"] is False
    r = api(sandbox, "GET", f"/crm/v3/objects/contacts/{created['id']}", access_token)
    assert r.json()["properties"]["email"] == "ann@example.com"
    r = api(sandbox, "GET", "/crm/v3/objects/contacts/bob@example.com?idProperty=email",
            access_token)
    assert assert_hubspot_error(r, 404, "OBJECT_NOT_FOUND")["message"] == "resource not found"
    r = api(sandbox, "GET", "/crm/v3/objects/contacts?limit=1", access_token)
    assert r.status_code == 200 and [c["id"] for c in r.json()["results"]] == [created["id"]]


@pytest.mark.parametrize("body", [
    {"inputs": []},
    {"inputs": [CONTACT] * 101},
    {"inputs": {"a": 1}},
    {},
    [],
    {"inputs": [{**CONTACT, "idProperty": "hs_object_id"}]},
    {"inputs": [{**CONTACT, "id": "not-an-email"}]},
    {"inputs": [{**CONTACT, "properties": {"age": 3}}]},
    {"inputs": [{**CONTACT, "properties": ["firstname"]}]},
    {"inputs": [{"idProperty": "email", "id": "ann@example.com"}]},
    {"inputs": [CONTACT, {**CONTACT, "id": "ann@EXAMPLE.com"}]},
])
def test_upsert_validation_errors(sandbox, access_token, body):
    r = api(sandbox, "POST", UPSERT, access_token, json=body)
    assert_hubspot_error(r, 400, "VALIDATION_ERROR")
    assert requests.get(sandbox.url + "/_sandbox/stats?log=0", timeout=5).json()[
        "effects_total"] == 0


# --- faults and the rate limit -------------------------------------------------------------

def test_a_500_after_the_effect_still_records_it(sandbox, access_token):
    requests.post(sandbox.url + "/_sandbox/faults", json={
        "fault": "error_after", "path": UPSERT, "count": 1}, timeout=5).raise_for_status()
    assert_hubspot_error(upsert(sandbox, access_token, CONTACT), 500, "INTERNAL_ERROR")
    stats = requests.get(sandbox.url + "/_sandbox/stats?log=0", timeout=5).json()
    assert stats["effects_by_key"] == {"ann@example.com": 1}
    retry = upsert(sandbox, access_token, CONTACT)
    assert retry.status_code == 200 and retry.json()["results"][0]["new"] is False
    stats = requests.get(sandbox.url + "/_sandbox/stats?log=0", timeout=5).json()
    assert stats["effects_by_key"] == {"ann@example.com": 1}


def test_a_503_before_the_effect_and_a_fault_matching_the_email(sandbox, access_token):
    requests.post(sandbox.url + "/_sandbox/faults", json={
        "fault": "error_before", "match_key": "bob@", "count": 1}, timeout=5).raise_for_status()
    assert upsert(sandbox, access_token, CONTACT).status_code == 200
    bob = {**CONTACT, "id": "Bob@example.com"}
    assert_hubspot_error(upsert(sandbox, access_token, bob), 503, "INTERNAL_ERROR")
    stats = requests.get(sandbox.url + "/_sandbox/stats?log=0", timeout=5).json()
    assert stats["effects_by_key"] == {"ann@example.com": 1}


def test_the_rate_limit_answers_hubspots_429(sandbox, access_token):
    config(sandbox, rate_limit={"limit": 1, "window_s": 60, "path_prefix": "/crm/"})
    assert upsert(sandbox, access_token, CONTACT).status_code == 200
    r = upsert(sandbox, access_token, CONTACT)
    body = assert_hubspot_error(r, 429, "RATE_LIMITS")
    assert body["message"] == "You have reached your secondly limit."
    assert body["errorType"] == "RATE_LIMIT" and int(r.headers["Retry-After"]) >= 1


# --- control API ---------------------------------------------------------------------------

def test_stats_and_config_never_show_a_token_or_the_secret(sandbox):
    client, token, _, location = connect(sandbox)
    new = client.refresh_token(sandbox.url + "/oauth/v1/token")
    upsert(sandbox, new["access_token"], CONTACT)
    shown = requests.get(sandbox.url + "/_sandbox/stats?log=1", timeout=5).text
    shown += requests.get(sandbox.url + "/_sandbox/config", timeout=5).text
    for secret in (token["access_token"], token["refresh_token"], new["access_token"],
                   new["refresh_token"], query_of(location)["code"], SECRET):
        assert secret not in shown
    assert "sbx-" not in shown


def test_config_validates_crm_settings_and_reset_restores_defaults(sandbox):
    for bad in ({"crm_access_token_ttl_s": 0}, {"crm_access_token_ttl_s": 1.5},
                {"crm_refresh_grace_s": -1}, {"crm_auth_code_ttl_s": True},
                {"crm_deny_authorization": "yes"}, {"crm_client_id": ""},
                {"crm_client_secret": 5}):
        r = requests.post(sandbox.url + "/_sandbox/config", json=bad, timeout=5)
        assert r.status_code == 400 and r.json()["error"]["message"], bad
    connect(sandbox)
    shown = config(sandbox, crm_client_id="other-client", crm_client_secret="other-secret-1234",
                   crm_access_token_ttl_s=60, crm_refresh_grace_s=0.5)
    assert shown["crm_client_id"] == "other-client" and "1234" in shown["crm_client_secret"]
    assert "other-secret" not in shown["crm_client_secret"]
    url, _ = session().create_authorization_url(sandbox.url + "/oauth/authorize",
                                                code_verifier=generate_token(48))
    assert requests.get(url, allow_redirects=False, timeout=5).status_code == 400
    requests.post(sandbox.url + "/_sandbox/reset", timeout=5).raise_for_status()
    shown = config(sandbox)
    assert (shown["crm_client_id"], shown["crm_access_token_ttl_s"],
            shown["crm_refresh_grace_s"], shown["crm_auth_code_ttl_s"],
            shown["crm_deny_authorization"]) == ("other-client", 1800, 30, 600, False)
    assert crm_stats(sandbox)["authorizations"] == 0


def test_main_reads_the_crm_client_from_the_environment():
    env = {**os.environ, "SANDBOX_CRM_CLIENT_ID": "env-client",
           "SANDBOX_CRM_CLIENT_SECRET": "env-secret-0123456789"}
    proc = subprocess.Popen([sys.executable, "-m", "sandbox", "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip().rsplit(" ", 1)[1]
        basic = base64.b64encode(b"env-client:env-secret-0123456789").decode()
        r = requests.post(url + "/oauth/v1/token", data={"grant_type": "refresh_token",
                                                         "refresh_token": "sbx-rt-x"},
                          headers={"Authorization": f"Basic {basic}"}, timeout=5)
        assert json.loads(r.text)["error"] == "invalid_grant"   # the client was accepted
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
