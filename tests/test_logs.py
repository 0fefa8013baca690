"""``outbox.logs``: one sanitised line per record, the bound context on each, text or JSON."""

from __future__ import annotations

import io
import json
import logging

import pytest

from outbox import logs


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_lines_carry_the_bound_context_and_are_sanitised(restore_root):
    out = io.StringIO()
    logs.configure("INFO", "text", out)
    with logs.bound(provider="payments", message_id="01J", correlation_id="r-1 token=abc"):
        logging.getLogger("x").warning("card 4242 4242 4242 4242 for ann@example.com\r\nFAKE")
    logging.getLogger("x").warning("after")
    first, second = out.getvalue().splitlines()
    assert first.endswith("provider=payments message_id=01J correlation_id=r-1 token=***")
    assert "****4242" in first and "***@example.com" in first and "ann@" not in first
    assert "FAKE" in first                      # CR/LF became spaces: still one line
    assert second.endswith("WARNING x: after")


def test_json_lines_have_the_context_at_the_top_and_no_raw_extras(restore_root):
    out = io.StringIO()
    logs.configure("INFO", "json", out)
    with logs.bound(provider="email", attempt=2):
        try:
            raise ValueError("sk_live_secret123 for ann@example.com")
        except ValueError:
            logging.getLogger("celery.app.trace").error(
                "failed", exc_info=True,
                extra={"data": {"exc": "ValueError('ann@example.com')", "n": 3}})
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert (record["provider"], record["attempt"], record["level"]) == ("email", "2", "ERROR")
    assert record["data"] == {"exc": "ValueError('***@example.com')", "n": 3}
    assert "sk_live_secret123" not in line and "ann@" not in line
    assert "outbox" not in record and "context" not in record


def test_quiet_loggers_and_bad_settings(restore_root):
    logs.configure("DEBUG", "text", io.StringIO())
    assert logging.getLogger("celery.app.trace").level == logging.WARNING
    with pytest.raises(ValueError, match="OUTBOX_LOG_FORMAT"):
        logs.configure("INFO", "xml")
    with pytest.raises(ValueError, match="OUTBOX_LOG_LEVEL"):
        logs.configure("LOUD", "text")
