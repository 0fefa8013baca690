"""Celery glue: the app (``celery -A tasks``), the delivery and dead-letter tasks, the publisher.

Joins ``outbox`` (the durable store) and ``integrations`` (the providers). The
broker only ever carries a message id and a readable label.
"""

from celery import Celery

app = Celery("tasks")
app.config_from_object("celeryconfig")

from . import deadletter, delivery  # noqa: E402  (tasks register on the app above)

__all__ = ["app", "delivery", "deadletter"]
