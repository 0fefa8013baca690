"""``outbox endpoints`` (issue 10 §2): add prints the id and, once, the signing secret;
list never shows a secret; disable/enable/rotate-secret; bad input is one line, exit 2."""

from __future__ import annotations

import json

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from tests.harness import run_cli

URL = "https://93.184.216.34/hooks/in"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OUTBOX_SECRET_KEY", Fernet.generate_key().decode())
    monkeypatch.delenv("OUTBOX_SECRET_KEY_FILE", raising=False)
    monkeypatch.delenv("OUTBOX_WEBHOOKS_ALLOW_HOSTS", raising=False)


def _add(capsys, *extra) -> dict:
    code, out, err = run_cli(capsys, "endpoints", "add", URL, "--events", "invoice.paid,*",
                             *extra, "--json")
    assert (code, err) == (0, "")
    return json.loads(out)


def _raw_rows(sessions) -> str:
    with sessions() as session:
        return " ".join(str(v) for r in session.execute(
            text("SELECT * FROM outbox_webhook_endpoints")) for v in r)


def test_add_prints_the_id_and_the_secret_once_and_list_never(cli_db, capsys):
    code, out, err = run_cli(capsys, "endpoints", "add", URL, "--events", "invoice.paid",
                             "--rate-limit", "10/s")
    assert (code, err) == (0, "")
    first, second = out.strip().splitlines()
    endpoint_id = first.split()[0]
    secret = second.rsplit(" ", 1)[1]
    assert endpoint_id.startswith("ep_") and secret.startswith("whsec_")
    assert first == f"{endpoint_id} {URL} events invoice.paid rate limit 10/s"
    assert out.count(secret) == 1
    for argv in (("endpoints", "list"), ("endpoints", "list", "--json")):
        code, listed, _ = run_cli(capsys, *argv)
        assert code == 0 and endpoint_id in listed
        assert secret not in listed and "whsec_" not in listed
    assert secret not in _raw_rows(cli_db) and "whsec_" not in _raw_rows(cli_db)


def test_add_json_carries_the_secret_and_list_json_the_endpoint(cli_db, capsys):
    added = _add(capsys, "--rate-limit", "600 / M")
    assert added["secret"].startswith("whsec_") and added["rate_limit"] == "600/m"
    assert (added["events"], added["status"]) == (["invoice.paid", "*"], "enabled")
    code, out, _ = run_cli(capsys, "endpoints", "list", "--json")
    [listed] = json.loads(out)
    assert listed == {k: v for k, v in added.items() if k != "secret"}


def test_disable_enable_and_rotate_secret(cli_db, capsys):
    added = _add(capsys)
    endpoint_id = added["id"]
    code, out, _ = run_cli(capsys, "endpoints", "disable", endpoint_id, "--reason",
                           "customer asked")
    assert (code, out.strip()) == (0, f"{endpoint_id} disabled (customer asked)")
    code, out, _ = run_cli(capsys, "endpoints", "list")
    assert "disabled" in out and "(customer asked)" in out
    code, out, _ = run_cli(capsys, "endpoints", "enable", endpoint_id, "--json")
    assert code == 0 and json.loads(out)["status"] == "enabled"
    assert json.loads(out)["disabled_reason"] is None

    code, out, err = run_cli(capsys, "endpoints", "rotate-secret", endpoint_id)
    assert (code, err) == (0, "")
    new = out.splitlines()[0].rsplit(" ", 1)[1]
    assert new.startswith("whsec_") and new != added["secret"]
    assert "the previous secret also signs until" in out
    code, out, _ = run_cli(capsys, "endpoints", "list")
    assert "previous secret until" in out and new not in out
    code, out, _ = run_cli(capsys, "endpoints", "rotate-secret", endpoint_id, "--json")
    rotated = json.loads(out)
    assert rotated["secret"].startswith("whsec_") and rotated["previous_secret_expires_at"]
    assert new not in _raw_rows(cli_db) and rotated["secret"] not in _raw_rows(cli_db)


@pytest.mark.parametrize("argv, says", [
    (("disable", "ep_NOSUCH"), "no endpoint 'ep_NOSUCH'"),
    (("enable", "ep_NOSUCH"), "no endpoint 'ep_NOSUCH'"),
    (("rotate-secret", "ep_NOSUCH"), "no endpoint 'ep_NOSUCH'"),
    (("add", URL, "--events", " , "), "name at least one event type"),
    (("add", URL, "--events", "invoice paid"), "'invoice paid' is not an event type"),
    (("add", URL, "--events", "a.b", "--rate-limit", "fast"), "--rate-limit: invalid rate limit"),
    (("add", URL, "--events", "a.b", "--rate-limit", "0/s"), "--rate-limit: invalid rate limit"),
    (("add", "http://93.184.216.34/in", "--events", "a.b"), "refused URL: the URL must be https"),
    (("add", "https://user:pw@93.184.216.34/in", "--events", "a.b"),
     "refused URL: the URL may not carry credentials"),
    (("add", "https://10.0.0.7/in", "--events", "a.b"), "refused URL: 10.0.0.7 resolves to"),
    (("add", URL), "the following arguments are required: --events"),
    (("add", URL + "\r\nX-Injected: 1", "--events", "a.b"), "spaces or control characters"),
    (("add", "https://93.184.216.34/" + "x" * 2000, "--events", "a.b"), "longer than 2000"),
])
def test_bad_input_is_one_line_and_exit_2(cli_db, capsys, argv, says):
    code, out, err = run_cli(capsys, "endpoints", *argv)
    assert code == 2 and out == ""
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert run_cli(capsys, "endpoints", "list", "--json")[1].strip() == "[]"


def test_without_a_secret_key_add_says_how_to_make_one(cli_db, capsys, monkeypatch):
    monkeypatch.delenv("OUTBOX_SECRET_KEY")
    code, out, err = run_cli(capsys, "endpoints", "add", URL, "--events", "a.b")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "OUTBOX_SECRET_KEY" in err and "Fernet.generate_key()" in err


def test_status_is_ok_with_the_webhooks_provider(cli_db, capsys):
    """No base URL and no credential: nothing for health to complain about."""
    code, out, err = run_cli(capsys, "status", "--json")
    data = json.loads(out)
    assert code == 0 and data["level"] == "ok"
    assert data["providers"]["webhooks"]["level"] == "ok"
