"""Celery glue: the app (``celery -A tasks``), the delivery and dead-letter tasks, the publisher.

Joins ``outbox`` (the durable store) and ``integrations`` (the providers). The
broker only ever carries a message id and a readable label.
"""

import sys

from celery import Celery, signals

from outbox import logs

app = Celery("tasks")
app.config_from_object("celeryconfig")


@signals.setup_logging.connect
def _configure_logging(loglevel=None, **_):
    """Our one log handler (``outbox.logs``); connecting here stops Celery configuring its own."""
    try:
        logs.configure(loglevel)
    except ValueError as exc:
        print(f"worker: refusing to start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@signals.worker_init.connect
def _check_before_start(sender=None, **_):
    """Refuse to start on bad settings, an unreadable key or an un-migrated database
    (``tasks.startup``); print the warnings.

    SystemExit passes through Celery's signal dispatch (it only catches Exception).
    """
    import schemas

    from .startup import check_broker, check_worker

    schemas.compile_all()   # now, not in the threads racing for their first rate-limit slots
    queues = list(sender.app.amqp.queues.consume_from) if sender is not None else []
    found = check_worker(queues)
    if sender is not None:
        found.problems += check_broker(sender.app, queues).problems
    for warning in found.warnings:
        print(f"worker: WARNING: {warning}", file=sys.stderr, flush=True)
    if found.problems:
        print(f"worker: refusing to start: {'; '.join(found.problems)}", file=sys.stderr,
              flush=True)
        raise SystemExit(2)


from . import alerts, delivery  # noqa: E402  (tasks register on the app above)

__all__ = ["app", "alerts", "delivery"]
