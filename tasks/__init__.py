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
    from outbox.config import RelaySettings, retry_policy

    try:
        lease_s = RelaySettings.from_env().lease_s
        for name in known_providers():
            retry_policy(name)
            provider = get_provider(name)
            longest_s = (provider.settings.connect_timeout_s + provider.settings.read_timeout_s
                         + provider.protection.settings.max_wait_s)
            if lease_s <= longest_s:
                # The relay would presume a slow call dead and send the message again while
                # it is still in flight: harmless with an idempotency key, a duplicate without.
                print(f"worker: WARNING: OUTBOX_LEASE={lease_s:g}s is not longer than the "
                      f"longest {name} call ({longest_s:g}s: timeouts + max wait)",
                      file=sys.stderr, flush=True)
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
