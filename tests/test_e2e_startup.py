"""What a real worker process does at start-up (``tasks.startup``) and how it logs: it refuses
to start (exit 2, one line naming the variable) on an unreadable key, a bad log format or
an un-migrated database; it warns on a key file others can read; with
``OUTBOX_LOG_FORMAT=json`` every line is a JSON object carrying the delivery's context."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import pytest

from integrations.errors import CredentialUnavailable
from integrations.registry import build_provider
from outbox import enqueue
from outbox.models import AttemptOutcome, Message, MessageStatus
from tasks.delivery import deliver_message
from tests.harness import BIN, ROOT, wait_until

pytestmark = pytest.mark.slow


def _start(stack_env, tmp_path, queues="payments", **env) -> subprocess.CompletedProcess:
    """Run a worker that should refuse to start; its output."""
    return subprocess.run(
        [str(BIN / "celery"), "-A", "tasks", "worker", "-Q", queues, "-P", "threads", "-c", "1",
         "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
        cwd=ROOT, env={**_env(stack_env), **env}, capture_output=True, text=True, timeout=60)


def _env(stack_env) -> dict:
    import os

    return {**os.environ, **stack_env, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("problem", ["missing", "empty", "not-utf8", "folder"])
def test_a_worker_refuses_to_start_on_an_unreadable_key_file(stack_env, tmp_path, problem):
    path = tmp_path / "payments.key"
    if problem == "empty":
        path.write_text("\n")
    elif problem == "not-utf8":
        path.write_bytes(b"sk_test_\xff\xfe")
    elif problem == "folder":
        path.mkdir()
    env = {k: v for k, v in stack_env.items() if k != "OUTBOX_PAYMENTS_API_KEY"}
    done = _start(env, tmp_path, OUTBOX_PAYMENTS_API_KEY="", OUTBOX_PAYMENTS_API_KEY_FILE=str(path))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-2000:]
    [line] = [x for x in output.splitlines() if "refusing to start" in x]
    assert "OUTBOX_PAYMENTS_API_KEY_FILE" in line and "Traceback" not in output


def test_a_worker_for_another_queue_is_not_held_back_by_that_key(stack_env, procs, tmp_path):
    """Only the providers a worker consumes need a readable key: an email worker starts."""
    proc = procs.worker("mail", queues="email", OUTBOX_PAYMENTS_API_KEY="",
                        OUTBOX_PAYMENTS_API_KEY_FILE=str(tmp_path / "missing"))
    assert proc.poll() is None


def test_a_key_file_readable_by_others_starts_with_a_warning(stack_env, procs, tmp_path):
    path = tmp_path / "payments.key"
    path.write_text("sk_test_outbox")
    path.chmod(0o644)
    procs.worker("w1", queues="payments", OUTBOX_PAYMENTS_API_KEY="",
                 OUTBOX_PAYMENTS_API_KEY_FILE=str(path))
    log = procs.log("w1")
    assert "WARNING: OUTBOX_PAYMENTS_API_KEY_FILE" in log and "readable by group or others" in log
    assert "sk_test_outbox" not in log


def test_a_worker_refuses_an_unmigrated_database_and_a_bad_log_format(stack_env, tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    done = _start(stack_env, tmp_path, DATABASE_URL=f"sqlite:///{empty}")
    assert done.returncode == 2
    assert "database not migrated: run outbox db upgrade" in done.stdout + done.stderr
    done = _start(stack_env, tmp_path, OUTBOX_LOG_FORMAT="xml")
    assert done.returncode == 2 and "OUTBOX_LOG_FORMAT" in done.stdout + done.stderr


def test_json_logs_carry_the_delivery_context(stack_env, procs, sessions, celery_publisher):
    """One JSON object per line; a delivery's outcome line has its label, class and code, and
    the bound context (provider, message_id, attempt) as top-level fields."""
    procs.worker("w1", queues="payments", OUTBOX_LOG_FORMAT="json")
    with sessions() as session:
        message = enqueue(session, provider="payments", operation="charge",
                          payload={"amount": 100, "currency": "usd", "customer": "cus_declined"},
                          idempotency_key="json-logs")
        session.commit()
    wait_until(lambda: "dead letter payments.charge" in procs.log("w1"), 30,
               message="the dead letter's log line")
    records = []
    for line in procs.log("w1").splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    [dead] = [r for r in records if r["message"].startswith("dead letter")]
    assert dead["message"] == (f"dead letter payments.charge {message.id} client_error 402 "
                               "card_declined: not retryable")
    assert (dead["provider"], dead["message_id"], dead["attempt"]) == (
        "payments", message.id, "1")
    assert dead["level"] == "WARNING" and "exc_info" not in dead
    assert any(r["message"].endswith("ready.") for r in records)
    assert "Traceback" not in procs.log("w1")


def test_a_key_that_becomes_unreadable_defers_without_spending_an_attempt(sessions, publisher,
                                                                          tmp_path, sandbox):
    """The key file disappears while running: the message is deferred (30 s), attempts stay
    0, nothing reaches the provider; once the file is back the message is delivered."""
    path = tmp_path / "key"
    path.write_text("sk_test_outbox")
    provider = build_provider("payments", {"OUTBOX_PAYMENTS_BASE_URL": sandbox.url,
                                           "OUTBOX_PAYMENTS_API_KEY_FILE": str(path)})
    with sessions() as session:
        message = enqueue(session, provider="payments", operation="charge",
                          payload={"amount": 100, "currency": "usd"}, idempotency_key="rotated")
        session.commit()
    path.unlink()
    with pytest.raises(CredentialUnavailable):
        provider.client.credentials.get()
    from outbox.clock import utcnow

    now = utcnow() + timedelta(seconds=1)
    result = deliver_message(message.id, sessions=sessions, lease=timedelta(minutes=1),
                             provider_for=lambda _: provider, clock=lambda: now)
    assert result.outcome is AttemptOutcome.DEFERRED
    assert result.next_attempt_at == now + timedelta(seconds=30)
    with sessions() as session:
        row = session.get(Message, message.id)
        assert (row.status, row.attempts) == (MessageStatus.PENDING, 0)
    assert sandbox.state.stats(include_log=False)["requests_total"] == 0
    path.write_text("sk_test_outbox")
    later = now + timedelta(seconds=31)
    result = deliver_message(message.id, sessions=sessions, lease=timedelta(minutes=1),
                             provider_for=lambda _: provider, clock=lambda: later)
    assert result.outcome is AttemptOutcome.DELIVERED
