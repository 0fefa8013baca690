"""Inbound handlers for ``test_e2e_inbound.py`` (loaded by a real worker through
``OUTBOX_HANDLERS``): the first run writes its row, then the worker process is SIGKILLed
before the transaction commits; every later run writes its row and returns."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from sqlalchemy import text

from outbox.inbound import handler


@handler("payments", "payment_intent.succeeded")
def crash_once(session, event):
    session.execute(text("INSERT INTO test_crash_effects (event_id) VALUES (:e)"),
                    {"e": event.id})
    marker = Path(os.environ["CRASH_MARKER"])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)   # mid-transaction: nothing was committed
