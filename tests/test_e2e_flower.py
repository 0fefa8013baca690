"""Flower end to end with real processes: basic auth, queues, task states, no payloads.

A real worker (``payments,dead_letter``), Flower started through ``tasks.flower``
on a free loopback port, the sandbox provider, and real HTTP to Flower. SQLite
only: what is tested here is what Flower shows, not the database.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests
from sqlalchemy import select

from outbox import Message, MessageStatus, enqueue
from tests.harness import ROOT, free_port, wait_until

pytestmark = pytest.mark.slow

USER, PASSWORD = "ops", "correct-horse-battery"
AUTH = (USER, PASSWORD)
SECRET_AMOUNT = 424242
SECRET_NOTE = "do-not-show-XYZ"
API_KEY = "sk_test_outbox"


@pytest.fixture
def db_url(sqlite_url):
    """Only SQLite in this module (overrides the sqlite/postgresql parametrisation)."""
    return sqlite_url


class Flower:
    """A running Flower: its base URL and authenticated JSON helpers."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, auth=AUTH, **params) -> requests.Response:
        return requests.get(self.url + path, auth=auth, params=params or None, timeout=10)

    def tasks(self, **params) -> dict[str, dict]:
        response = self.get("/api/tasks", **params)
        response.raise_for_status()
        return response.json()

    def tasks_text(self) -> str:
        response = self.get("/api/tasks")
        response.raise_for_status()
        return response.text


@pytest.fixture
def flower(procs) -> Flower:
    """A worker on ``payments,dead_letter`` (fast retries) and Flower with basic auth."""
    procs.worker(OUTBOX_PAYMENTS_RETRY_BASE="0.2")
    return Flower(procs.flower(USER, PASSWORD))


def _enqueue(sessions, key: str, **payload) -> tuple[str, str]:
    """Enqueue and commit one charge (dispatched after commit); return (id, label)."""
    with sessions() as session:
        message = enqueue(session, provider="payments", operation="charge",
                          payload={"amount": 1999, "currency": "usd", **payload},
                          idempotency_key=key)
        ids = message.id, message.label
        session.commit()
    return ids


def _status(sessions, message_id: str) -> str | None:
    with sessions() as session:
        return session.scalar(select(Message.status).where(Message.id == message_id))


def _by_args(tasks: dict[str, dict], args: str, state: str | None = None) -> list[dict]:
    return [t for t in tasks.values()
            if t.get("args") == args and (state is None or t.get("state") == state)]


# ---- the launcher --------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (None, "FLOWER_BASIC_AUTH is not set"),
    ("ops:short", "at least 8 characters"),
])
def test_launcher_refuses_to_start_without_strong_basic_auth(value, expected):
    """Given no or a short FLOWER_BASIC_AUTH, `python -m tasks.flower` exits 2 and says why."""
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    if value is not None:
        env["FLOWER_BASIC_AUTH"] = value
    done = subprocess.run([sys.executable, "-m", "tasks.flower", f"--port={free_port()}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "refusing to start" in done.stderr
    assert expected in done.stderr
    assert "short" not in done.stderr          # the password is never echoed


# ---- a running Flower ----------------------------------------------------------------------

def test_api_requires_auth_and_lists_both_queues(flower):
    """Given basic auth, /api answers 401 without credentials and lists the consumed queues."""
    assert flower.get("/api/workers", auth=None).status_code == 401
    assert flower.get("/api/workers", auth=(USER, "wrong-password")).status_code == 401
    assert flower.get("/api/queues/length", auth=None).status_code == 401

    workers = wait_until(lambda: (r := flower.get("/api/workers")).status_code == 200
                         and r.json(), 30, 0.2, message="Flower to list the worker")
    assert any(name.startswith("w1@") for name in workers)

    def queue_names():
        response = flower.get("/api/queues/length")
        assert response.status_code == 200
        names = {q["name"] for q in response.json()["active_queues"]}
        return names if {"payments", "dead_letter"} <= names else None

    wait_until(queue_names, 30, 0.2, message="payments and dead_letter in /api/queues/length")


def test_dead_letter_shows_failure_and_labels_never_payloads(flower, sessions, celery_publisher):
    """Given a declined charge, Flower shows FAILURE + a dead_letter task, labels only."""
    good_id, good_label = _enqueue(sessions, "flower-good")
    dead_id, dead_label = _enqueue(sessions, "flower-declined", customer="cus_declined",
                                   amount=SECRET_AMOUNT, metadata={"secret_note": SECRET_NOTE})
    wait_until(lambda: _status(sessions, dead_id) == MessageStatus.DEAD, 30,
               message="the declined charge to be dead")
    wait_until(lambda: _status(sessions, good_id) == MessageStatus.DELIVERED, 30,
               message="the good charge to be delivered")

    def flower_saw_everything():
        tasks = flower.tasks()
        return (tasks if len(flower.tasks(taskname="outbox.dead_letter")) == 1
                and _by_args(tasks, dead_label, "FAILURE")
                and _by_args(tasks, good_label, "SUCCESS") else None)

    tasks = wait_until(flower_saw_everything, 30, 0.2,
                       message="Flower to show the FAILURE, SUCCESS and dead_letter tasks")

    [failed] = _by_args(tasks, dead_label, "FAILURE")
    assert failed["name"] == "outbox.deliver"
    assert "402 card_declined" in failed["exception"]
    [succeeded] = [t for t in _by_args(tasks, good_label, "SUCCESS")
                   if t["name"] == "outbox.deliver"]
    assert succeeded["state"] == "SUCCESS"
    [dead_letter] = flower.tasks(taskname="outbox.dead_letter").values()
    assert dead_letter["args"] == (f"{dead_label} client_error 402 card_declined: "
                                   "not retryable")
    assert dead_id in dead_letter["args"]

    text = flower.tasks_text()
    # Codes and labels only: no payload value, no key, and neither the provider's message
    # nor the customer id it names (kept, masked, in the attempt row: `outbox show`).
    for secret in (str(SECRET_AMOUNT), SECRET_NOTE, API_KEY, "Your card was declined",
                   "cus_declined"):
        assert secret not in text, f"{secret!r} is visible in Flower's /api/tasks"
    assert dead_id in text and good_id in text   # the ids are what Flower shows

    metrics = requests.get(flower.url + "/metrics", timeout=10).text
    assert any(line.startswith("flower_events_total")
               and 'task="outbox.dead_letter"' in line for line in metrics.splitlines())
    for secret in (str(SECRET_AMOUNT), SECRET_NOTE, API_KEY):
        assert secret not in metrics


def test_retryable_error_shows_retry_then_success(flower, procs, sandbox, sessions,
                                                 celery_publisher):
    """Given one 503 from the provider, Flower shows RETRY (transient 503), then SUCCESS."""
    procs.relay(OUTBOX_PAYMENTS_RETRY_BASE="0.2")
    key = "flower-retry"
    response = requests.post(sandbox.url + "/_sandbox/faults", timeout=5, json={
        "fault": "error_before", "status": 503, "count": 1, "match_key": key})
    assert response.status_code < 300, response.text
    message_id, label = _enqueue(sessions, key)

    wait_until(lambda: _status(sessions, message_id) == MessageStatus.DELIVERED, 30,
               message="the charge to be delivered after one retry")

    def retried_and_succeeded():
        tasks = flower.tasks(taskname="outbox.deliver")
        retried, succeeded = _by_args(tasks, label, "RETRY"), _by_args(tasks, label, "SUCCESS")
        return (retried, succeeded) if retried and succeeded else None

    retried, succeeded = wait_until(retried_and_succeeded, 30, 0.2,
                                    message="Flower to show RETRY then SUCCESS")
    [retry] = retried
    assert "transient" in retry["exception"] and "503" in retry["exception"]
    assert retry["uuid"] not in {t["uuid"] for t in succeeded}    # a new broker message
    assert min(t["timestamp"] for t in succeeded) >= retry["timestamp"]
