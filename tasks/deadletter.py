"""The dead-letter task: one per dead-lettering, on the ``dead_letter`` queue.

It exists so that operators see every dead letter in Flower (a queue needs a
consumer to be listed there) and so that an alert is raised in one place. The
count awaiting action lives in the outbox (``outbox status``), not here.
"""

from __future__ import annotations

import logging

from outbox.models import Message

from . import app, runtime

log = logging.getLogger("tasks.deadletter")


@app.task(name="outbox.dead_letter")
def dead_letter(message_id: str) -> str:
    """Raise the alert for a dead-lettered message and return its one-line summary."""
    with runtime.sessions()() as session:
        message = session.get(Message, message_id)
        if message is None:
            return f"{message_id}: no such message"
        summary = (f"{message.label} {message.last_status_code or ''} "
                   f"{message.last_error_class or ''}: {message.last_error or ''}")
    log.error("DEAD LETTER %s (attempts=%s); re-drive with: outbox dead redrive %s --reason ...",
              summary, message.attempts, message_id)
    return summary
