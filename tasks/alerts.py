"""The dead-letter alert: one ``outbox.dead_letter`` task per dead-lettering, on the
``dead_letter`` queue.

It exists so that operators see every dead letter in Flower (a queue needs a consumer to
be listed there) and so that the alert is raised in one place. The count awaiting action
lives in the outbox (``outbox status``), not here. Its result, which Flower shows, holds
codes and labels only; the provider's text stays in the database (``outbox show``).
"""

from __future__ import annotations

import logging

from outbox.models import Message

from . import app, runtime

log = logging.getLogger("outbox.alerts")


@app.task(name="outbox.dead_letter")
def dead_letter_alert(message_id: str) -> str:
    """Raise the alert for a dead-lettered message and return its one-line summary."""
    with runtime.sessions()() as session:
        message = session.get(Message, message_id)
        if message is None:
            return f"{message_id}: no such message"
        summary = " ".join(str(p) for p in (
            message.label, message.last_error_class, message.last_status_code,
            "needs review" if message.needs_review else None) if p)
        attempts = message.attempts
    log.error("DEAD LETTER %s (attempts=%s); re-drive with: outbox dead redrive %s --reason ...",
              summary, attempts, message_id)
    return summary
