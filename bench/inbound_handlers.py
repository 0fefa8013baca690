"""The handler ``bench inbound`` processes events with: one row written per event, in the
event's transaction, as a real handler would (``OUTBOX_HANDLERS=bench.inbound_handlers``)."""

from __future__ import annotations

from sqlalchemy import text

from outbox.inbound import handler


@handler("payments", "payment_intent.succeeded")
def record(session, event):
    session.execute(text("INSERT INTO bench_inbound_effects (event_id) VALUES (:e)"),
                    {"e": event.id})
