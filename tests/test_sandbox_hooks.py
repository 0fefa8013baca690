"""The sandbox's receiver for the webhooks provider (``sandbox/hooks.py``): counts per
webhook-id, verifies with ``standardwebhooks`` when it has the secret, answers as
configured, and refuses malformed settings."""

from __future__ import annotations

from datetime import UTC, datetime

import requests
from standardwebhooks.webhooks import Webhook

from integrations.webhooks.endpoints import new_secret

BODY = b'{"type":"invoice.paid","timestamp":"2026-12-07T15:00:00Z","data":{}}'


def _signed(secret, msg_id="msg_1"):
    now = datetime.now(UTC)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, now, BODY)}


def test_deliveries_are_counted_verified_and_answered_as_configured(sandbox):
    secret = new_secret()
    url = f"{sandbox.url}/_sandbox/hooks/a"
    assert requests.post(url + "/config", json={"secret": secret}, timeout=5).json() == {
        "hook": "a"}   # the secret is never echoed
    assert requests.post(url, data=BODY, headers=_signed(secret), timeout=5).status_code == 204
    assert requests.post(url, data=BODY, headers=_signed(new_secret()),
                         timeout=5).status_code == 204
    requests.post(url + "/config", json={"status": 429, "retry_after": "3"}, timeout=5)
    answer = requests.post(url, data=BODY, headers=_signed(secret, "msg_2"), timeout=5)
    assert (answer.status_code, answer.headers["Retry-After"]) == (429, "3")
    hooks = requests.get(f"{sandbox.url}/_sandbox/stats?log=0", timeout=5).json()["hooks"]
    assert hooks == {"a": {"received": 3, "by_id": {"msg_1": 2, "msg_2": 1}, "verified": 2,
                           "unverified": 1}}
    requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).raise_for_status()
    assert sandbox.state.hooks.stats() == {}


def test_bad_settings_and_paths_are_refused(sandbox):
    base = f"{sandbox.url}/_sandbox/hooks"
    for body in ({"status": 99}, {"status": "503"}, {"delay_s": -1}, {"colour": "red"}, [1]):
        assert requests.post(f"{base}/a/config", json=body, timeout=5).status_code == 400
    assert requests.post(f"{base}/a/config", data=b"{", timeout=5).status_code == 400
    assert requests.post(f"{base}/a/b/c", data=BODY, timeout=5).status_code == 404
    assert requests.get(f"{base}/a", timeout=5).status_code == 405
