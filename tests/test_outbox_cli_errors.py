"""The CLI's answers to bad input, a database that is not ready, and unhealthy states: one
``outbox: error:`` line and exit 2 (never a traceback or a secret), and status exit codes
0 ok / 1 warning / 2 critical with the threshold that tripped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from integrations import registry
from integrations.errors import Ambiguous, ClientError
from outbox import enqueue
from outbox.db import make_engine
from outbox.lifecycle import claim
from outbox.models import MessageStatus
from tests.harness import fail_claimed, run_cli

OUTBOX = str(Path(sys.executable).parent / "outbox")


run = run_cli


def one_error_line(err: str) -> str:
    """The single stderr line, checked to be an error line without a traceback."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("outbox: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture
def db(cli_db):
    return cli_db


# ---- bad input: one line, exit 2 ----------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["dead", "list", "--since", "10000000d"], "--since"),
    (["dead", "list", "--since", "0001-01-01T00:00:00+05:00"], "--since"),
    (["dead", "list", "--limit", "-5"], "--limit"),
    (["dead", "list", "--limit", "x"], "--limit"),
    (["enqueue", "payments", "charge", "--key", "k", "--payload", "[" * 5000 + "]" * 5000],
     "nested too deeply"),
    (["enqueue", "payments", "charge", "--key", "k", "--payload",
      '{"amount": ' + "9" * 5001 + ', "currency": "usd"}'], "too large"),
    (["enqueue", "payments", "charge", "--key", "k", "--payload",
      '{"amount": 19.0, "currency": "usd"}'], "$.amount"),
    (["enqueue", "payments", "charge", "--key", " k", "--payload",
      '{"amount": 19, "currency": "usd"}'], "idempotency_key"),
    (["enqueue", "payments", "charge", "--key", "k", "--correlation-id", "a\r\nb",
      "--payload", '{"amount": 19, "currency": "usd"}'], "correlation_id"),
    (["nosuchcommand"], "invalid choice"),
    (["sandbox", "--port", "99999"], "not a TCP port"),
])
def test_bad_input_is_one_error_line_and_exit_2(capsys, db, argv, words):
    """Each of the issue's reproductions: one 'outbox: error:' line naming what is wrong."""
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert words in one_error_line(err)


@pytest.mark.parametrize("url, words", [
    ("garbage", "DATABASE_URL is not a database URL"),
    ("foo://x/y", "DATABASE_URL: no driver"),
    ("postgresql://postgres:s3cret-pw@127.0.0.1:5432/outbox_does_not_exist",
     'database "outbox_does_not_exist" does not exist'),
    ("postgresql://postgres@127.0.0.1:1/test", "database unreachable"),
])
def test_a_bad_or_unreachable_database_is_one_line(capsys, monkeypatch, provider_env, url, words):
    """Malformed URLs, unknown drivers, a missing PostgreSQL database, a closed port: one line,
    exit 2, never the password."""
    monkeypatch.setenv("DATABASE_URL", url)
    for argv in (["status"], ["dead", "list"], ["db", "upgrade"]):
        code, _, err = run(capsys, *argv)
        line = one_error_line(err)
        assert code == 2 and words in line and "s3cret" not in err, argv


def test_only_db_upgrade_creates_a_database(tmp_path, capsys, monkeypatch, provider_env):
    """Outside any project, with no DATABASE_URL: every command but `db upgrade` says
    'database not migrated' and creates nothing (no file, no folders); `db upgrade` creates
    the default database in the user's data folder, and then everything works from anywhere."""
    home = tmp_path / "home"
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for argv in (["status"], ["dead", "list"], ["show", "X"], ["relay", "--once"],
                 ["enqueue", "payments", "charge", "--key", "k", "--payload", "{}"]):
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert "database not migrated: run outbox db upgrade" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []            # no var/, no home/.local/...
    code, out, _ = run(capsys, "db", "upgrade")
    assert code == 0
    database = home / ".local" / "share" / "integration-outbox" / "outbox.db"
    assert database.exists() and str(database) in out
    code, _, _ = run(capsys, "status")
    assert code == 0


def test_a_mistyped_sqlite_path_creates_no_folders(tmp_path, capsys, monkeypatch, provider_env):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/no/such/dir/outbox.db")
    code, _, err = run(capsys, "status")
    assert code == 2 and "database not migrated" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_an_unmigrated_or_old_database_is_refused(tmp_path, capsys, monkeypatch, provider_env):
    """An empty SQLite file, or one migrated only to 0001: 'database not migrated'."""
    from outbox.migrations import upgrade

    empty = tmp_path / "empty.db"
    sa.create_engine(f"sqlite:///{empty}").connect().close()
    old = tmp_path / "old.db"
    upgrade(f"sqlite:///{old}", "0001")
    for path, state in ((empty, "schema empty"), (old, "at revision 0001")):
        monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
        code, _, err = run(capsys, "dead", "list")
        line = one_error_line(err)
        assert code == 2 and "database not migrated: run outbox db upgrade" in line
        assert state in line


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The real console script, in a fresh directory, on a missing database."""
    env = {**os.environ, "HOME": str(tmp_path), "DATABASE_URL": ""}
    env.pop("XDG_DATA_HOME", None)
    done = subprocess.run([OUTBOX, "status"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert "database not migrated: run outbox db upgrade" in one_error_line(done.stderr)


def test_limit_is_checked_before_postgresql_sees_it(capsys, monkeypatch, pg_url, provider_env):
    """`--limit -5` on PostgreSQL used to reach the server as a DataError."""
    monkeypatch.setenv("DATABASE_URL", pg_url)
    code, _, err = run(capsys, "dead", "list", "--limit", "-5")
    assert code == 2 and "--limit" in one_error_line(err)


def test_plain_postgresql_urls_work_with_psycopg_3(capsys, monkeypatch, pg_url, provider_env,
                                                    publisher):
    """`postgresql://user@host/db` (what hosting platforms hand out) uses psycopg 3, and the
    message is dispatched right after commit (it once was not: psycopg 3 reports no rowcount
    for the INSERT, so enqueue took its own new row for an existing one and left it to the
    relay); `postgresql+psycopg2://` keeps working on the same database."""
    plain = sa.engine.make_url(pg_url).set(drivername="postgresql").render_as_string(False)
    monkeypatch.setenv("DATABASE_URL", plain)
    code, out, err = run(capsys, "enqueue", "payments", "charge", "--key", "plain-1",
                         "--payload", '{"amount": 100, "currency": "usd"}')
    assert code == 0, err
    assert len(publisher.published) == 1, "dispatched after commit"
    engine = make_engine(plain)
    assert engine.dialect.driver == "psycopg"
    engine.dispose()
    monkeypatch.setenv("DATABASE_URL", pg_url)   # postgresql+psycopg2://
    code, out, _ = run(capsys, "dead", "list", "--json")
    assert code == 0 and json.loads(out) == []


# ---- status: exit codes and reasons -----------------------------------------------------------

def test_status_exit_codes_follow_the_level(capsys, db):
    """ok → 0; 100 waiting messages → warning, exit 1, naming the threshold."""
    assert run(capsys, "status")[0] == 0
    with db() as session:
        for n in range(100):
            enqueue(session, provider="payments", operation="charge",
                    payload={"amount": 100, "currency": "usd"}, idempotency_key=f"depth-{n}")
        session.commit()
    code, out, _ = run(capsys, "status")
    assert code == 1
    assert "outbox status: warning" in out and "WARNING: queue depth 100 ≥ 100" in out


def test_redis_unreachable_is_critical(capsys, db, monkeypatch):
    """Limits and breakers are unknown without Redis: critical, exit 2, and why."""
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    registry.reset()
    code, out, _ = run(capsys, "status")
    assert code == 2
    assert "outbox status: critical" in out
    assert "CRITICAL: Redis unreachable" in out and "are unknown" in out


def test_an_unreadable_key_file_is_critical(capsys, db, monkeypatch, tmp_path):
    monkeypatch.delenv("OUTBOX_EMAIL_API_KEY")
    monkeypatch.setenv("OUTBOX_EMAIL_API_KEY_FILE", str(tmp_path / "missing-key"))
    registry.reset()
    data_code, out, _ = run(capsys, "status", "--json")
    data = json.loads(out)
    assert data_code == 2 and data["level"] == "critical"
    [finding] = data["providers"]["email"]["findings"]
    assert finding["check"] == "credential" and "OUTBOX_EMAIL_API_KEY_FILE" in finding["reason"]
    assert data["providers"]["payments"]["level"] == "ok"


def test_the_error_rate_reason_names_the_codes(capsys, db):
    """'error rate N % over 5 min ≥ 5 % (402 ×2, 500 ×1)'."""
    with db() as session:
        ids = [enqueue(session, provider="payments", operation="charge",
                       payload={"amount": 100, "currency": "usd"},
                       idempotency_key=f"e{n}").id for n in range(3)]
        session.commit()
    errors = [ClientError("no", status_code=402), ClientError("no", status_code=402),
              Ambiguous("boom", status_code=500)]
    with db() as session:
        for message_id, error in zip(ids, errors, strict=True):
            fail_claimed(session, claim(session, message_id, timedelta(minutes=1)), error)
    code, out, _ = run(capsys, "status")
    assert code == 2
    assert "CRITICAL: error rate 100% over 5 min ≥ 5% (402 ×2, 500 ×1)" in out


# ---- re-drive safety ---------------------------------------------------------------------------

def _dead_email(db, key="mail-1", error=None):
    with db() as session:
        message_id = enqueue(session, provider="email", operation="send",
                             payload={"to": "a@example.com", "subject": "Hi", "text": "x"},
                             idempotency_key=key).id
        session.commit()
    with db() as session:
        fail_claimed(session, claim(session, message_id, timedelta(minutes=1)),
                     error or Ambiguous("boom", status_code=500), idempotent=False)
    return message_id


def test_redrive_all_needs_a_provider_or_any_provider(capsys, db):
    _dead_email(db, error=ClientError("bad", status_code=400))
    code, _, err = run(capsys, "dead", "redrive", "--all", "--reason", "r")
    assert code == 2 and "--any-provider" in one_error_line(err)
    code, out, _ = run(capsys, "dead", "redrive", "--all", "--any-provider", "--reason", "r")
    assert code == 0 and "acted on 1 of 1" in out


def test_ids_with_filters_are_refused(capsys, db):
    message_id = _dead_email(db, error=ClientError("bad", status_code=400))
    code, _, err = run(capsys, "dead", "redrive", message_id, "--provider", "payments",
                       "--reason", "r")
    assert code == 2 and "not both" in one_error_line(err)
    with db() as session:
        from outbox.models import Message

        assert session.get(Message, message_id).status == MessageStatus.DEAD


def test_needs_review_requires_accepting_the_duplicate_risk(capsys, db):
    """A 'needs review' email is skipped (exit 1, the note says what it risks) until
    --accept-duplicate-risk is given."""
    message_id = _dead_email(db)
    code, out, _ = run(capsys, "dead", "list")
    assert "[needs review]" in out
    code, out, _ = run(capsys, "dead", "redrive", message_id, "--reason", "r")
    assert code == 1 and "may already have acted" in out and "--accept-duplicate-risk" in out
    code, out, _ = run(capsys, "dead", "redrive", message_id, "--reason", "checked: not sent",
                       "--accept-duplicate-risk")
    assert code == 0 and "redrive done" in out


def test_the_relay_refuses_to_start_on_a_providers_bad_retry_settings(capsys, db, monkeypatch):
    monkeypatch.setenv("OUTBOX_EMAIL_MAX_ATTEMPTS", "lots")
    code, _, err = run(capsys, "relay", "--once")
    assert code == 2 and "OUTBOX_EMAIL_MAX_ATTEMPTS" in one_error_line(err)


def test_the_old_default_database_is_pointed_out(tmp_path, capsys, monkeypatch, provider_env):
    """A var/outbox.db in this folder (the default until issue 6) and no database at the new
    default: the error says how to keep using the old one; nothing is created."""
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "outbox.db").touch()
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "status")
    line = one_error_line(err)
    assert code == 2 and f"DATABASE_URL=sqlite:///{tmp_path}/var/outbox.db" in line
    assert not (tmp_path / "home").exists()
