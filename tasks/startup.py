"""What a worker checks before it consumes anything; it refuses to start (exit 2) on a problem.

* every provider's settings parse (rate-limit specs, timeouts, retry policy, the delay
  before a lookup of an ambiguous attempt);
* the database is reachable and migrated to the latest revision;
* for each provider queue this worker consumes, the credential can be read now (a key
  file that is missing, unreadable, empty or not UTF-8 would defer every message until
  someone looks: ``integrations.credentials``);
* consuming the ``webhooks`` queue, ``OUTBOX_SECRET_KEY`` holds Fernet keys (the endpoint
  secrets cannot be decrypted without them: every webhook would wait);

* on RabbitMQ, each queue it consumes can be declared as configured (a durable quorum
  queue): a queue left from an older set-up as a classic queue would otherwise stop the
  worker with Celery's traceback (``check_broker``);

and warns (starts anyway) when:

* ``OUTBOX_LEASE`` is not longer than a provider's longest call (timeouts + max wait): the
  relay would presume a slow call dead and send again while it is still in flight;
* a key file is readable by group or others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from integrations.errors import ConfigurationError
from integrations.protection import ProtectionSettings
from integrations.registry import check_provider, known_providers, verify_after
from integrations.secretbox import SecretBox
from outbox.config import INBOUND, RelaySettings, retry_policy
from outbox.db import check_migrated
from outbox.endpoints import PROVIDER as WEBHOOKS
from outbox.errors import DatabaseNotReady
from outbox.inbound import load_handlers

from . import runtime


@dataclass
class Findings:
    """Problems stop the worker; warnings are printed and it starts."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_worker(queues: Iterable[str]) -> Findings:
    """Check what a worker consuming ``queues`` needs (see the module docstring)."""
    found = Findings()
    try:
        lease_s = RelaySettings.from_env().lease_s
    except ConfigurationError as exc:
        found.problems.append(str(exc))
        return found
    consumed = set(queues)
    for name in known_providers():
        try:
            retry_policy(name)
            verify_after(name)
        except ConfigurationError as exc:
            found.problems.append(str(exc))
        check = check_provider(name)
        if check.provider is None:
            found.problems.append(check.settings_error)
            continue
        provider = check.provider
        longest_s = (provider.settings.connect_timeout_s + provider.settings.read_timeout_s
                     + provider.protection.settings.max_wait_s)
        if lease_s <= longest_s:
            found.warnings.append(f"OUTBOX_LEASE={lease_s:g}s is not longer than the longest "
                                  f"{name} call ({longest_s:g}s: timeouts + max wait)")
        if name in consumed:
            found.warnings += check.warnings
            if check.credential_error and check.reauthorize:
                # Not a reason to stop: its messages wait, and go out once it is connected.
                found.warnings.append(f"{name}: {check.credential_error}")
            elif check.credential_error:
                found.problems.append(f"{name}: credential unavailable: {check.credential_error}")
    if WEBHOOKS in consumed:
        try:
            SecretBox.from_env()
        except ConfigurationError as exc:
            found.problems.append(f"webhooks: {exc}")
    if INBOUND in consumed:
        try:
            names = load_handlers()
        except Exception as exc:  # noqa: BLE001  (user code: any import failure)
            found.problems.append(f"OUTBOX_HANDLERS: cannot import the handlers "
                                  f"({type(exc).__name__}: {exc})")
        else:
            if not names:
                found.warnings.append("no inbound handlers (OUTBOX_HANDLERS is unset and no "
                                      "outbox.handlers entry point): every event is ignored")
        try:
            ProtectionSettings.from_env(INBOUND)
            retry_policy(INBOUND)
        except ConfigurationError as exc:
            found.problems.append(str(exc))
    try:
        check_migrated(runtime.engine())
    except (ConfigurationError, DatabaseNotReady) as exc:
        found.problems.append(str(exc))
    return found


def check_broker(app, queues: Iterable[str]) -> Findings:
    """On RabbitMQ, declare each queue the worker consumes as ``celeryconfig`` says (a durable
    quorum queue) and report a queue that exists with other arguments (a classic queue from
    an older set-up) as a problem naming it. An unreachable broker is not a problem here:
    Celery retries the connection at start-up and says so."""
    from kombu.exceptions import OperationalError

    from outbox.broker_url import AMQP, broker_kind

    found = Findings()
    names = [q for q in queues if q in app.amqp.queues]
    if broker_kind(app.conf.broker_url) != AMQP or not names:
        return found
    connection = app.connection_for_write()
    try:
        connection.ensure_connection(max_retries=1, interval_start=0)
        for name in names:
            channel = connection.channel()
            try:
                app.amqp.queues[name].bind(channel).declare()
            except connection.channel_errors as exc:   # the broker closed the channel
                found.problems.append(
                    f"RabbitMQ queue {name!r} exists with other arguments than a durable "
                    f"quorum queue ({getattr(exc, 'reply_text', exc)}); drain and delete it, "
                    "or use a new vhost (README: RabbitMQ)")
            else:
                channel.close()
    except (OperationalError, *connection.connection_errors):
        pass   # Celery's own start-up retries the connection and logs it
    finally:
        connection.release()
    return found
