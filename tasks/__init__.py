"""Celery glue: the app (``celery -A tasks``), the delivery and dead-letter tasks, the publisher.

Joins ``outbox`` (the durable store) and ``integrations`` (the providers). The
broker only ever carries a message id and a readable label.
"""

import sys

from celery import Celery, signals

from integrations.sanitize import SanitizingFilter

from .logcontext import install as _install_log_context

_install_log_context()   # before any worker log line: the log format prints the context
app = Celery("tasks")
app.config_from_object("celeryconfig")


@signals.worker_init.connect
def _check_configuration(**_):
    """Refuse to start a worker on bad settings (rate-limit specs, timeouts, retry policy).

    SystemExit passes through Celery's signal dispatch (it only catches Exception).
    """
    from integrations.registry import get_provider, known_providers
    from outbox.config import retry_policy

    try:
        for name in known_providers():
            retry_policy(name)
            get_provider(name)
    except ValueError as exc:   # both packages' ConfigurationError are ValueErrors
        print(f"worker: refusing to start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _sanitize_logs(logger=None, **_):
    """Mask credentials, card numbers and CR/LF in every line a worker writes."""
    for handler in logger.handlers:
        if not any(isinstance(f, SanitizingFilter) for f in handler.filters):
            handler.addFilter(SanitizingFilter())

from . import deadletter, delivery  # noqa: E402  (tasks register on the app above)

__all__ = ["app", "delivery", "deadletter"]
