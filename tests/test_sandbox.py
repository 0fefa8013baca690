"""The sandbox provider over real loopback HTTP: API, idempotency, faults and accounting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
# The project is not necessarily pip-installed; make the repository root importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sandbox.server import SandboxServer  # noqa: E402

KEY = "sk_test_sandbox"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHARGE = {"amount": "1000", "currency": "usd", "customer": "cus_1", "metadata[order]": "42",
          "confirm": "true"}   # as the adapter sends it: created and confirmed


@pytest.fixture(scope="module")
def server():
    srv = SandboxServer(host="127.0.0.1", port=0, payments_api_key=KEY)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def srv(server):
    requests.post(server.url + "/_sandbox/reset", timeout=5).raise_for_status()
    requests.post(server.url + "/_sandbox/config", json={"api_key": KEY}, timeout=5)
    return server


def charge(srv, key=None, data=CHARGE, timeout=5, headers=None, **kw):
    h = dict(AUTH)
    if key is not None:
        h["Idempotency-Key"] = key
    h.update(headers or {})
    return requests.post(srv.url + "/v1/payment_intents", data=data, headers=h,
                         timeout=timeout, **kw)


def fault(srv, **spec):
    r = requests.post(srv.url + "/_sandbox/faults", json=spec, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def stats(srv):
    return requests.get(srv.url + "/_sandbox/stats", timeout=5).json()


# --- payments API -----------------------------------------------------------

def test_create_charge_counts_one_effect(srv):
    r = charge(srv, "k1", headers={"Stripe-Version": "2024-06-20"})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("pi_") and len(body["id"]) == 27
    assert body["object"] == "payment_intent" and body["status"] == "succeeded"
    assert (body["amount"], body["currency"], body["customer"]) == (1000, "usd", "cus_1")
    assert body["metadata"] == {"order": "42"} and body["livemode"] is False
    assert isinstance(body["created"], int)
    assert r.headers["Stripe-Version"] == "2024-06-20"
    assert r.headers["Request-Id"].startswith("req_")
    s = stats(srv)
    assert s["effects_total"] == 1 and s["effects_by_key"] == {"k1": 1}
    assert s["requests_by_key"] == {"k1": 1} and s["status_counts"] == {"200": 1}
    assert srv.state.stats(include_log=False)["effects_total"] == 1


@pytest.mark.parametrize("data, code, param", [
    ({"currency": "usd"}, "parameter_missing", "amount"),
    ({"amount": "ten", "currency": "usd"}, "parameter_invalid_integer", "amount"),
    ({"amount": "0", "currency": "usd"}, "amount_too_small", "amount"),
    ({"amount": "5"}, "parameter_missing", "currency"),
    ({"amount": "5", "currency": "USD"}, "parameter_invalid", "currency"),
    ({"amount": "5", "currency": "usd", "bogus": "1"}, "parameter_unknown", "bogus"),
])
def test_invalid_params_are_400_and_not_stored(srv, data, code, param):
    r = charge(srv, "bad", data=data)
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", code, param)
    # Validation failures are not saved: the key is free for a corrected request.
    assert charge(srv, "bad").status_code == 200
    assert stats(srv)["effects_total"] == 1


@pytest.mark.parametrize("data, status, code, decline", [
    ({**CHARGE, "customer": "cus_declined"}, 402, "card_declined", "generic_decline"),
    ({**CHARGE, "customer": "cus_insufficient"}, 402, "card_declined", "insufficient_funds"),
    ({**CHARGE, "payment_method": "pm_card_expired"}, 402, "expired_card", "expired_card"),
])
def test_declines_are_not_stored_so_a_fixed_card_can_be_retried(srv, data, status, code, decline):
    """A decline is answered each time (not replayed), and no effect is made."""
    r = charge(srv, "dec", data=data)
    assert r.status_code == status
    err = r.json()["error"]
    assert (err["type"], err["code"], err["decline_code"]) == ("card_error", code, decline)
    again = charge(srv, "dec", data=data)
    assert again.status_code == 402 and "Idempotent-Replayed" not in again.headers
    assert stats(srv)["effects_total"] == 0


def test_fixing_a_customers_card_lets_the_same_key_succeed(srv):
    """Removing a customer from declined_customers (card data fixed) → same key now charges once."""
    data = {**CHARGE, "customer": "cus_declined"}
    assert charge(srv, "fix", data=data).status_code == 402
    requests.post(srv.url + "/_sandbox/config", json={"declined_customers": []}, timeout=5)
    assert charge(srv, "fix", data=data).status_code == 200
    assert charge(srv, "fix", data=data).headers["Idempotent-Replayed"] == "true"
    assert stats(srv)["effects_by_key"] == {"fix": 1}


def test_auth_and_key_rotation(srv):
    r = charge(srv, headers={"Authorization": "Bearer sk_test_wrongwrongwrong1234"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "invalid_request_error"
    msg = r.json()["error"]["message"]
    assert msg.startswith("Invalid API Key provided: sk_test_") and "wrongwrong" not in msg
    assert charge(srv, headers={"Authorization": ""}).status_code == 401
    requests.post(srv.url + "/_sandbox/config", json={"api_key": "sk_test_new"}, timeout=5)
    assert charge(srv).status_code == 401
    assert charge(srv, headers={"Authorization": "Bearer sk_test_new"}).status_code == 200
    assert stats(srv)["effects_total"] == 1


def test_refunds(srv):
    pi = charge(srv, "c").json()["id"]
    h = {**AUTH, "Idempotency-Key": "r1"}
    r = requests.post(srv.url + "/v1/refunds", data={"payment_intent": pi, "amount": "400"},
                      headers=h, timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("re_") and body["object"] == "refund"
    assert (body["amount"], body["payment_intent"], body["currency"]) == (400, pi, "usd")
    too_much = requests.post(srv.url + "/v1/refunds", data={"payment_intent": pi, "amount": "700"},
                             headers=AUTH, timeout=5)
    assert too_much.status_code == 400
    assert too_much.json()["error"]["code"] == "amount_too_large"
    rest = requests.post(srv.url + "/v1/refunds", data={"payment_intent": pi}, headers=AUTH,
                         timeout=5)
    assert rest.status_code == 200 and rest.json()["amount"] == 600
    missing = requests.post(srv.url + "/v1/refunds", data={"payment_intent": "pi_nope"},
                            headers=AUTH, timeout=5)
    assert missing.status_code == 404
    err = missing.json()["error"]
    assert (err["code"], err["param"]) == ("resource_missing", "payment_intent")
    got = requests.get(srv.url + f"/v1/payment_intents/{pi}", headers=AUTH, timeout=5)
    assert got.status_code == 200 and got.json()["amount_refunded"] == 1000
    assert stats(srv)["effects_total"] == 3


def test_unknown_path_wrong_method_and_oversize(srv):
    r = requests.get(srv.url + "/v1/nothing", headers=AUTH, timeout=5)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert requests.get(srv.url + "/v1/payment_intents", headers=AUTH, timeout=5).status_code == 405
    big = requests.post(srv.url + "/v1/payment_intents", data=b"a" * (1024 * 1024 + 1),
                        headers=AUTH, timeout=5)
    assert big.status_code == 413
    assert stats(srv)["effects_total"] == 0


# --- idempotency --------------------------------------------------------------

def test_same_key_same_params_replays(srv):
    first = charge(srv, "same")
    second = charge(srv, "same", data=dict(reversed(list(CHARGE.items()))))
    assert second.status_code == 200 and second.headers["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert "Idempotent-Replayed" not in first.headers
    s = stats(srv)
    assert s["effects_by_key"] == {"same": 1} and s["requests_by_key"] == {"same": 2}


def test_same_key_different_params_is_400(srv):
    charge(srv, "k")
    r = charge(srv, "k", data={**CHARGE, "amount": "999"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "idempotency_error" and "'k'" in err["message"]
    assert stats(srv)["effects_total"] == 1


def test_key_too_long_is_400(srv):
    assert charge(srv, "x" * 256).status_code == 400
    assert charge(srv, "x" * 255).status_code == 200


def test_concurrent_same_key_gets_409(srv):
    fault(srv, fault="latency", delay_s=0.4, count=1)
    results = []
    t = threading.Thread(target=lambda: results.append(charge(srv, "race")))
    t.start()
    deadline = time.time() + 2
    while stats(srv)["in_flight"] == 0 and time.time() < deadline:
        time.sleep(0.01)
    second = charge(srv, "race")
    t.join()
    assert results[0].status_code == 200
    assert second.status_code == 409
    err = second.json()["error"]
    assert (err["type"], err["code"]) == ("idempotency_error", "idempotency_key_in_use")
    assert stats(srv)["effects_by_key"] == {"race": 1}
    assert stats(srv)["max_in_flight"] == 2


def test_idempotency_off_duplicates(srv):
    requests.post(srv.url + "/_sandbox/config", json={"idempotency": False}, timeout=5)
    assert charge(srv, "dup").json()["id"] != charge(srv, "dup").json()["id"]
    assert stats(srv)["effects_by_key"] == {"dup": 2}


def test_no_key_processed_every_time(srv):
    charge(srv)
    charge(srv)
    assert stats(srv)["effects_by_key"] == {"": 2}


# --- faults -------------------------------------------------------------------

def test_error_before_has_no_effect(srv):
    fault(srv, fault="error_before", status=503, count=1)
    r = charge(srv, "eb")
    assert r.status_code == 503 and r.json()["error"]["type"] == "api_error"
    assert stats(srv)["effects_total"] == 0
    assert charge(srv, "eb").status_code == 200  # count expired, key not stored
    s = stats(srv)
    assert s["effects_by_key"] == {"eb": 1} and s["status_counts"] == {"503": 1, "200": 1}


def test_error_after_applies_effect_then_replays_the_stored_500_as_stripe_does(srv):
    fault(srv, fault="error_after", status=500, count=1)
    r = charge(srv, "ea")
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert stats(srv)["effects_total"] == 1
    retry = charge(srv, "ea")
    assert (retry.status_code, retry.headers["Idempotent-Replayed"]) == (500, "true")
    assert retry.headers["Stripe-Should-Retry"] == "false" and retry.json() == r.json()
    assert stats(srv)["effects_by_key"] == {"ea": 1}


def test_error_after_replays_the_success_when_errors_are_not_stored(srv):
    requests.post(srv.url + "/_sandbox/config", json={"store_errors": False}, timeout=5)
    fault(srv, fault="error_after", status=500, count=1)
    assert charge(srv, "ea").status_code == 500
    retry = charge(srv, "ea")
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
    assert list(srv.state.payment_intents) == [retry.json()["id"]]
    assert stats(srv)["effects_by_key"] == {"ea": 1}


def test_search_finds_intents_by_metadata_after_the_lag(srv):
    requests.post(srv.url + "/_sandbox/config", json={"search_lag_s": 0.3}, timeout=5)
    made = charge(srv, "s1", data={**CHARGE, "metadata[outbox_key]": "it's-1"}).json()
    query = "metadata['outbox_key']:'it\\'s-1'"

    def search():
        r = requests.get(srv.url + "/v1/payment_intents/search", params={"query": query},
                         headers=AUTH, timeout=5)
        assert r.status_code == 200
        return [pi["id"] for pi in r.json()["data"]]

    assert search() == []            # not yet: Stripe's search is eventually consistent
    time.sleep(0.4)
    assert search() == [made["id"]]
    bad = requests.get(srv.url + "/v1/payment_intents/search", params={"query": "amount>1"},
                       headers=AUTH, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "query"


def test_rate_limit(srv):
    fault(srv, fault="rate_limit", retry_after="Wed, 21 Oct 2015 07:28:00 GMT", count=1)
    r = charge(srv, "rl")
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "Wed, 21 Oct 2015 07:28:00 GMT"
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit")
    assert stats(srv)["effects_total"] == 0


def test_drop_after_effect_then_replay(srv):
    fault(srv, fault="drop_after", count=1)
    with pytest.raises(requests.ConnectionError):
        charge(srv, "drop")
    assert stats(srv)["effects_by_key"] == {"drop": 1}
    retry = charge(srv, "drop")
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
    pi = retry.json()["id"]
    assert pi in srv.state.payment_intents and len(srv.state.payment_intents) == 1
    assert stats(srv)["status_counts"] == {"dropped": 1, "200": 1}


def test_slow_after_times_out_client_with_effect(srv):
    fault(srv, fault="slow_after", delay_s=1.0, count=1)
    with pytest.raises(requests.ReadTimeout):
        charge(srv, "slow", timeout=0.3)
    assert stats(srv)["effects_by_key"] == {"slow": 1}
    retry = charge(srv, "slow")
    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true"
    assert stats(srv)["effects_total"] == 1


def test_status_fault_arbitrary_body(srv):
    body = {"error": {"type": "idempotency_error", "code": "idempotency_key_in_use",
                      "message": "in progress"}}
    fault(srv, fault="status", status=409, body=body, path="/v1/payment_intents", count=1)
    r = charge(srv, "st")
    assert r.status_code == 409 and r.json() == body
    assert stats(srv)["effects_total"] == 0


def test_down_503_and_hang(srv):
    fid = fault(srv, fault="down", mode="503")
    assert [charge(srv).status_code for _ in range(3)] == [503, 503, 503]
    requests.delete(srv.url + "/_sandbox/faults", timeout=5)
    fault(srv, fault="down", mode="hang")
    with pytest.raises(requests.ReadTimeout):
        charge(srv, "hang", timeout=0.3)
    assert stats(srv)["effects_total"] == 0
    # Removing the fault ends the hung request with a 503; it never reaches the endpoint.
    requests.delete(srv.url + "/_sandbox/faults", timeout=5)
    deadline = time.time() + 2
    while stats(srv)["in_flight"] and time.time() < deadline:
        time.sleep(0.02)
    s = stats(srv)
    assert s["in_flight"] == 0 and s["effects_total"] == 0 and fid >= 1
    assert s["status_counts"]["503"] >= 3
    assert charge(srv, "hang").status_code == 200


def test_match_key_and_count_expiry(srv):
    fault(srv, fault="error_before", status=502, count=2, match_key="flaky")
    assert charge(srv, "solid-1").status_code == 200
    assert charge(srv, "flaky-1").status_code == 502
    assert charge(srv, "flaky-1").status_code == 502
    assert charge(srv, "flaky-1").status_code == 200
    listed = requests.get(srv.url + "/_sandbox/faults", timeout=5).json()["faults"]
    assert listed[0]["count"] == 0 and listed[0]["hits"] == 2


def test_bad_fault_spec_rejected(srv):
    r = requests.post(srv.url + "/_sandbox/faults", json={"fault": "nope"}, timeout=5)
    assert r.status_code == 400


# --- accounting and lifecycle -------------------------------------------------

def test_request_log_is_ordered(srv):
    for i in range(5):
        charge(srv, f"log-{i}")
    log = stats(srv)["request_log"]
    assert [e["key"] for e in log] == [f"log-{i}" for i in range(5)]
    ts = [e["t"] for e in log]
    assert ts == sorted(ts)
    assert all(e["t"] <= e["t_end"] and e["status"] == 200 for e in log)
    assert "request_log" not in requests.get(srv.url + "/_sandbox/stats?log=0", timeout=5).json()


def test_stop_does_not_hang_with_requests_in_progress():
    srv = SandboxServer(port=0, payments_api_key=KEY).start()
    fault(srv, fault="slow_after", delay_s=30, match_key="slow")
    fault(srv, fault="down", mode="hang", match_key="hang")
    errors = []

    def call(key):
        try:
            charge(srv, key, timeout=10)
        except requests.RequestException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(k,)) for k in ("slow", "hang")]
    for t in threads:
        t.start()
    deadline = time.time() + 2
    while srv.state.stats()["in_flight"] < 2 and time.time() < deadline:
        time.sleep(0.01)
    idle = requests.Session()
    idle.get(srv.url + "/_sandbox/stats?log=0", timeout=5)  # leaves a keep-alive connection open
    start = time.time()
    srv.stop()
    for t in threads:
        t.join(timeout=5)
    assert time.time() - start < 3
    assert len(errors) == 2


def test_refuses_non_loopback_host():
    with pytest.raises(ValueError, match="loopback"):
        SandboxServer(host="0.0.0.0", port=0)


def test_main_runs_and_stops_on_sigterm():
    env = {**os.environ, "SANDBOX_PAYMENTS_API_KEY": "sk_test_cli"}
    proc = subprocess.Popen([sys.executable, "-m", "sandbox", "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("sandbox listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        r = requests.post(url + "/v1/payment_intents", data=CHARGE,
                          headers={"Authorization": "Bearer sk_test_cli"}, timeout=5)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- email API (SendGrid-shaped) ------------------------------------------------

MAIL = {
    "personalizations": [{"to": [{"email": "ann@example.com", "name": "Ann"}]}],
    "from": {"email": "shop@example.com"},
    "subject": "Welcome",
    "content": [{"type": "text/plain", "value": "Hello"}, {"type": "text/html", "value": "<p>Hi"}],
}


def send_mail(srv, key=None, body=None, headers=None, timeout=5, header_key=None, **kw):
    doc = dict(MAIL if body is None else body)
    if key is not None:
        doc["custom_args"] = {"outbox_key": key}
    h = dict(AUTH)
    if header_key is not None:
        h["X-Message-Key"] = header_key
    h.update(headers or {})
    return requests.post(srv.url + "/v3/mail/send", json=doc, headers=h, timeout=timeout, **kw)


def test_email_accepted_202_empty_body_message_id_one_effect_per_request(srv):
    r = send_mail(srv, "welcome-1")
    assert r.status_code == 202 and r.content == b""
    assert len(r.headers["X-Message-Id"]) == 22
    assert srv.state.emails[r.headers["X-Message-Id"]]["to"] == ["ann@example.com"]
    # Not idempotent: the same key again is a second email, whatever the idempotency setting.
    assert send_mail(srv, "welcome-1").status_code == 202
    s = stats(srv)
    assert s["effects_by_key"] == {"welcome-1": 2} and s["requests_by_key"] == {"welcome-1": 2}
    assert s["status_counts"] == {"202": 2} and s["emails_total"] == 2


def test_email_key_from_custom_args_else_header(srv):
    send_mail(srv, "from-body", header_key="from-body")
    send_mail(srv, header_key="header-only")
    send_mail(srv, "body-wins", header_key="stale")
    send_mail(srv)
    s = stats(srv)
    expected = {"from-body": 1, "header-only": 1, "body-wins": 1, "": 1}
    assert s["effects_by_key"] == expected and s["requests_by_key"] == expected
    assert [e["key"] for e in s["request_log"]] == ["from-body", "header-only", "body-wins", ""]


def test_email_missing_everything_lists_every_sendgrid_error(srv):
    r = send_mail(srv, "bad", body={})
    assert r.status_code == 400
    errors = r.json()["errors"]
    assert [e["field"] for e in errors] == ["personalizations", "from", "subject", "content"]
    assert all(e["message"] and "help" in e for e in errors)
    assert stats(srv)["effects_total"] == 0


@pytest.mark.parametrize("change, field", [
    ({"personalizations": [{"to": []}]}, "personalizations.0.to"),
    ({"personalizations": [{"to": [{"email": "nope"}]}]}, "personalizations.0.to.0.email"),
    ({"personalizations": [{"to": [{"email": "a@x.io"}, {"email": "A@x.io"}]}]},
     "personalizations.0"),
    ({"from": {"email": "shop@"}}, "from.email"),
    ({"reply_to": {"name": "x"}}, "reply_to"),
    ({"subject": ""}, "subject"),
    ({"content": [{"type": "text/html", "value": "h"}, {"type": "text/plain", "value": "p"}]},
     "content"),
    ({"content": [{"type": "text/plain", "value": ""}]}, "content.0.value"),
    ({"categories": [str(i) for i in range(11)]}, "categories"),
    ({"custom_args": {"n": 1}}, "custom_args"),
    ({"reply-to": {"email": "a@x.io"}}, "reply-to"),
])
def test_email_validation_errors_name_the_field(srv, change, field):
    r = send_mail(srv, body={**MAIL, **change})
    assert r.status_code == 400
    assert [e["field"] for e in r.json()["errors"]] == [field]
    assert stats(srv)["effects_total"] == 0


def test_email_subject_per_personalization_and_html_only_are_fine(srv):
    body = {**MAIL, "personalizations": [{"to": [{"email": "a@x.io"}], "subject": "S"}],
            "content": [{"type": "text/html", "value": "<p>x"}]}
    del body["subject"]
    assert send_mail(srv, body=body).status_code == 202


def test_email_auth_method_path_json_and_size(srv):
    r = send_mail(srv, headers={"Authorization": "Bearer SG.wrong"})
    assert r.status_code == 401
    assert r.json()["errors"][0]["message"].startswith("The provided authorization grant")
    assert send_mail(srv, headers={"Authorization": ""}).status_code == 401
    r = requests.get(srv.url + "/v3/mail/send", headers=AUTH, timeout=5)
    assert r.status_code == 405 and "errors" in r.json()
    r = requests.post(srv.url + "/v3/nothing", json=MAIL, headers=AUTH, timeout=5)
    assert r.status_code == 404 and "errors" in r.json()
    r = requests.post(srv.url + "/v3/mail/send", data=b"{not json", headers=AUTH, timeout=5)
    assert r.status_code == 400 and "errors" in r.json()
    r = requests.post(srv.url + "/v3/mail/send", data=b"a" * (1024 * 1024 + 1), headers=AUTH,
                      timeout=5)
    assert r.status_code == 413 and "errors" in r.json()
    assert stats(srv)["effects_total"] == 0


def test_email_separate_key(srv):
    """By default the email API shares the payments key; email_api_key gives it its own."""
    try:
        configure(srv, email_api_key="SG.mailmailmail1234")
        assert send_mail(srv).status_code == 401
        mail_auth = {"Authorization": "Bearer SG.mailmailmail1234"}
        assert send_mail(srv, headers=mail_auth).status_code == 202
        # The payments API keeps its own key.
        assert charge(srv).status_code == 200
        assert charge(srv, headers=mail_auth).status_code == 401
        shown = configure(srv)["email_api_key"]
        assert shown.endswith("1234") and "mailmailmail" not in shown
    finally:
        assert configure(srv, email_api_key=None)["email_api_key"] is None
    assert send_mail(srv).status_code == 202
    r = requests.post(srv.url + "/_sandbox/config", json={"email_api_key": ""}, timeout=5)
    assert r.status_code == 400


def test_email_faults_answer_in_sendgrid_shape(srv):
    fault(srv, fault="error_before", status=503, path="/v3/mail/send", count=1)
    fault(srv, fault="error_after", status=500, match_key="after", count=1)
    fault(srv, fault="drop_after", match_key="drop", count=1)
    r = send_mail(srv, "before")
    assert r.status_code == 503 and r.json()["errors"][0]["message"]
    r = send_mail(srv, "after")
    assert r.status_code == 500 and "errors" in r.json()
    with pytest.raises(requests.ConnectionError):
        send_mail(srv, "drop")
    s = stats(srv)
    # error_before: no email; error_after and drop_after: the email went out.
    assert s["effects_by_key"] == {"after": 1, "drop": 1}
    assert s["status_counts"] == {"503": 1, "500": 1, "dropped": 1}
    # Payments paths are untouched by the email path filter.
    assert charge(srv, "pay").status_code == 200


def test_email_rate_limit_fault_and_down(srv):
    fault(srv, fault="rate_limit", retry_after="7", count=1)
    r = send_mail(srv, "rl")
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert r.json()["errors"][0]["message"].startswith("too many requests")
    fault(srv, fault="down", mode="503", count=1)
    assert send_mail(srv, "down").status_code == 503
    assert stats(srv)["effects_total"] == 0


# --- server-side rate limit --------------------------------------------------------

def configure(srv, **settings):
    r = requests.post(srv.url + "/_sandbox/config", json=settings, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def _burst(fn, n):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=10) as pool:
        return list(pool.map(fn, range(n)))


@pytest.mark.parametrize("api", ["email", "payments"])
def test_rate_limit_admits_exactly_the_limit_per_window(srv, api):
    """30 requests fired at once against 20/1 s: 20 accepted, 10 answered 429 with Retry-After."""
    assert configure(srv, rate_limit={"limit": 20, "window_s": 1.0})["rate_limit"] == {
        "limit": 20, "window_s": 1.0, "path_prefix": None}
    if api == "email":
        responses = _burst(lambda i: send_mail(srv, f"m-{i}"), 30)
        ok = 202
    else:
        responses = _burst(lambda i: charge(srv, f"c-{i}"), 30)
        ok = 200
    log = stats(srv)["request_log"]
    assert log[-1]["t"] - log[0]["t"] < 1.0, "the burst took over a second; the test is void"
    codes = sorted(r.status_code for r in responses)
    assert codes == [ok] * 20 + [429] * 10
    for r in responses:
        if r.status_code == 429:
            assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) >= 1
            body = r.json()
            if api == "email":
                assert body["errors"][0]["message"].startswith("too many requests")
            else:
                assert (body["error"]["type"], body["error"]["code"]) == ("rate_limit_error",
                                                                          "rate_limit")
    s = stats(srv)
    assert s["effects_total"] == 20
    assert s["status_counts"] == {str(ok): 20, "429": 10}


def test_rate_limit_window_slides_and_rejections_do_not_extend_it(srv):
    configure(srv, rate_limit={"limit": 2, "window_s": 0.5})
    assert [send_mail(srv).status_code for _ in range(2)] == [202, 202]
    for _ in range(3):
        r = send_mail(srv)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    time.sleep(0.55)
    assert [send_mail(srv).status_code for _ in range(3)] == [202, 202, 429]
    assert stats(srv)["effects_total"] == 4


def test_rate_limit_path_prefix_removal_reset_and_validation(srv):
    configure(srv, rate_limit={"limit": 1, "window_s": 60, "path_prefix": "/v3/"})
    assert send_mail(srv).status_code == 202
    r = send_mail(srv)
    assert r.status_code == 429 and 59 <= int(r.headers["Retry-After"]) <= 60
    assert [charge(srv).status_code for _ in range(3)] == [200] * 3   # other paths are free
    assert stats(srv)["status_counts"]["429"] == 1                    # the control API is free
    assert configure(srv, rate_limit=None)["rate_limit"] is None
    assert send_mail(srv).status_code == 202
    configure(srv, rate_limit={"limit": 1, "window_s": 60})
    assert charge(srv).status_code == 200 and charge(srv).status_code == 429
    requests.post(srv.url + "/_sandbox/reset", timeout=5).raise_for_status()
    assert configure(srv)["rate_limit"] is None
    assert charge(srv).status_code == 200
    for bad in ({"limit": 0, "window_s": 1}, {"limit": 1, "window_s": 0}, {"limit": 1},
                {"limit": 1, "window_s": 1, "path_prefix": "v3"}, {"limit": 1, "window_s": 1,
                                                                    "per": "x"}, [1]):
        r = requests.post(srv.url + "/_sandbox/config", json={"rate_limit": bad}, timeout=5)
        assert r.status_code == 400, bad


def test_email_answers_carry_sendgrid_rate_limit_headers(srv):
    """With a limit on /v3/, every e-mail answer says X-RateLimit-Limit/-Remaining/-Reset
    (epoch seconds), as SendGrid's do; the 429 too. Payments answers do not."""
    requests.post(srv.url + "/_sandbox/config", timeout=5, json={
        "rate_limit": {"limit": 3, "window_s": 10, "path_prefix": "/v3/"}}).raise_for_status()
    answers = [send_mail(srv, f"rl-{i}") for i in range(4)]
    assert [r.status_code for r in answers] == [202, 202, 202, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["2", "1", "0", "0"]
    assert {r.headers["X-RateLimit-Limit"] for r in answers} == {"3"}
    reset = int(answers[-1].headers["X-RateLimit-Reset"])
    assert time.time() < reset <= time.time() + 11
    assert "X-RateLimit-Remaining" not in charge(srv, "no-limit-headers").headers


def test_email_sandbox_mode_validates_and_sends_nothing(srv):
    body = {**MAIL, "mail_settings": {"sandbox_mode": {"enable": True}}}
    r = send_mail(srv, "sandbox-mode", body=body)
    assert (r.status_code, r.content, r.headers.get("X-Message-Id")) == (200, b"", None)
    assert send_mail(srv, body={**body, "subject": ""}).status_code == 400   # still validated
    assert stats(srv)["effects_total"] == 0 and srv.state.emails == {}


@pytest.mark.parametrize("kind", ["cc", "bcc"])
def test_email_an_address_twice_across_to_cc_and_bcc_is_400(srv, kind):
    people = {"to": [{"email": "ann@example.com"}], kind: [{"email": "Ann@Example.com"}]}
    r = send_mail(srv, body={**MAIL, "personalizations": [people]})
    assert r.status_code == 400
    [error] = r.json()["errors"]
    assert error["field"] == "personalizations.0" and f"personalizations.0.{kind}" in error["message"]
    assert stats(srv)["effects_total"] == 0


# --- payments fidelity (issue 10 §4) ------------------------------------------------------

def _config(srv, **settings):
    r = requests.post(srv.url + "/_sandbox/config", json=settings, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("currency, amount, ok", [
    ("usd", 49, False), ("usd", 50, True), ("gbp", 29, False), ("gbp", 30, True),
    ("sek", 299, False)])
def test_an_amount_under_the_currency_minimum_is_amount_too_small(srv, currency, amount, ok):
    r = charge(srv, f"min-{currency}-{amount}", data={"amount": str(amount), "currency": currency})
    if ok:
        assert r.status_code == 200
    else:
        assert r.status_code == 400
        assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("amount_too_small",
                                                                            "amount")
        assert stats(srv)["effects_total"] == 0


@pytest.mark.parametrize("extra, status, effect", [
    ({}, "requires_payment_method", False),
    ({"payment_method": "pm_card_visa"}, "requires_confirmation", False),
    ({"confirm": "true", "payment_method": "pm_card_authenticationRequired"},
     "requires_action", False),
    ({"confirm": "true", "payment_method": "pm_card_processing"}, "processing", True),
    ({"confirm": "true", "payment_method": "pm_card_visa"}, "succeeded", True),
])
def test_confirm_and_the_payment_method_decide_where_a_charge_ends(srv, extra, status, effect):
    r = charge(srv, f"state-{status}", data={"amount": "1000", "currency": "usd", **extra})
    assert r.status_code == 200 and r.json()["status"] == status
    assert stats(srv)["effects_total"] == (1 if effect else 0)


def test_the_adapter_classifies_every_state_a_2xx_charge_can_end_in(srv):
    """None of them is silently "delivered": requires_action (3-D Secure) cannot be completed
    by a background charge — a client error, nothing charged; processing is delivered and
    says that it settles later."""
    from integrations.errors import ClientError
    from integrations.registry import build_provider

    provider = build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": srv.url,
                                           "OUTBOX_PAYMENTS_API_KEY": KEY})
    charge_ = {"amount": 1000, "currency": "usd"}
    with pytest.raises(ClientError) as caught:
        provider.deliver("charge", {**charge_, "payment_method": "pm_card_authenticationRequired"},
                         "needs-3ds")
    assert caught.value.code == "payment_intent_requires_action"
    settling = provider.deliver("charge", {**charge_, "payment_method": "pm_card_processing"},
                                "bank-debit")
    assert settling.summary.endswith("processing: accepted, settles later (its webhook says how)")
    assert provider.deliver("charge", {**charge_, "payment_method": "pm_card_visa"},
                            "card").summary.endswith(" succeeded")
    provider.close()


def test_a_decline_is_kept_under_its_key_only_when_asked(srv):
    declined = {"amount": "1000", "currency": "usd", "customer": "cus_declined"}
    assert charge(srv, "d1", data=declined).status_code == 402
    _config(srv, declined_customers=[])               # the card is fixed …
    assert charge(srv, "d1", data=declined).status_code == 200   # … and the key goes through
    _config(srv, declined_customers=["cus_declined"], store_declines=True)   # as Stripe does
    assert charge(srv, "d2", data=declined).status_code == 402
    _config(srv, declined_customers=[])
    again = charge(srv, "d2", data=declined)
    assert again.status_code == 402 and again.headers["Idempotent-Replayed"] == "true"


def test_idempotency_keys_expire_after_24_hours_of_the_sandbox_clock(srv):
    first = charge(srv, "aging").json()
    _config(srv, advance_clock_s=23 * 3600)
    assert charge(srv, "aging").json()["id"] == first["id"]      # replayed
    assert _config(srv, advance_clock_s=3600)["clock_offset_s"] == 24 * 3600
    assert charge(srv, "aging").json()["id"] != first["id"]      # a new request: a new charge
    assert stats(srv)["effects_by_key"] == {"aging": 2}
