"""Celery glue: the app (``celery -A tasks``), the delivery and dead-letter tasks, the publisher.

Joins ``outbox`` (the durable store) and ``integrations`` (the providers). The
broker only ever carries a message id and a readable label.
"""

from celery import Celery, signals

from integrations.sanitize import SanitizingFilter

app = Celery("tasks")
app.config_from_object("celeryconfig")


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _sanitize_logs(logger=None, **_):
    """Mask credentials, card numbers and CR/LF in every line a worker writes."""
    for handler in logger.handlers:
        if not any(isinstance(f, SanitizingFilter) for f in handler.filters):
            handler.addFilter(SanitizingFilter())

from . import deadletter, delivery  # noqa: E402  (tasks register on the app above)

__all__ = ["app", "delivery", "deadletter"]
