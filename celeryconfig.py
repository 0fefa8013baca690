"""Celery settings for integration-outbox (lowercase names only; read by ``tasks.app``).

Delivery safety: JSON only, late acknowledgement, re-queue when a worker process
dies, one message prefetched at a time. Retries are *not* timed by Celery
(no countdown/eta): the outbox row holds ``next_attempt_at`` and the relay
publishes it when due, so the Redis visibility timeout never re-runs a delayed task.

The broker is ``CELERY_BROKER_URL`` if set, else ``REDIS_URL`` (``outbox.broker_url``);
``REDIS_URL`` stays the limiter/breaker store either way. On RabbitMQ (``amqp://``) every
queue is a durable quorum queue and every publish waits for the broker's confirm.
"""

import sys as _sys

from kombu import Exchange, Queue

from integrations.errors import ConfigurationError as _ConfigurationError
from outbox import broker_url as _broker
from outbox import config as _config

broker_url = _broker.broker_url()
_KIND = _broker.broker_kind(broker_url)   # "redis" or "amqp"
result_backend = None
task_ignore_result = True

task_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"

task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

# No task time limits: Celery enforces them only in the prefork pool, and the Procfile runs
# threads. What bounds a delivery is (1) the HTTP timeouts on every socket operation
# (OUTBOX_<NAME>_CONNECT_TIMEOUT / _TIMEOUT) and (2) the lease (OUTBOX_LEASE, 120 s): past
# it the relay takes the message over — the same key again, or "needs review" for a
# provider without idempotency — and a late outcome from the stuck thread is fenced off.
if _KIND == _broker.AMQP:
    # Publisher confirms are on for the outbox's publishes (tasks.publisher opens its own
    # connections with {"confirm_publish": True}): a publish returns once RabbitMQ has the
    # message in the quorum queue and raises if it refuses it. Not here, for every
    # connection: a worker's pool threads would wait for confirms on the event connection
    # that its event loop also reads, and can hang the worker (see tasks.publisher).
    broker_transport_options = {}
    # Quorum queues have no global QoS: Celery (>= 5.5) sees the x-queue-type argument and
    # applies the prefetch per consumer. It is the default; said here because it matters.
    worker_detect_quorum_queues = True
    # Without Celery's native delayed delivery (28 idle quorum queues, for countdown/eta,
    # which the outbox never uses): see tasks.consumer.
    worker_consumer = "tasks.consumer:Consumer"
    # A worker that dies with a message unacknowledged has it redelivered when its
    # connection drops (RabbitMQ has no visibility timeout); the claim makes that harmless.
else:
    # Redis: an unacknowledged message is redelivered after this; the claim makes that
    # harmless. Socket timeouts: without them a Redis that stops answering without closing
    # the connection (failover, NAT, a paused VM) hangs a publish forever (kombu's default).
    broker_transport_options = {"visibility_timeout": 3600, "socket_timeout": 5,
                                "socket_connect_timeout": 4}

# Flower needs events; sent events let Flower show tasks waiting in a queue.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

# One queue per provider (bulkheads) plus dead_letter; every queue is declared.
# Each queue has its own direct exchange and routing key, so a message reaches one queue only.
# On RabbitMQ they are durable quorum queues (replicated, fsynced before the confirm).
_QUEUE_ARGUMENTS = {"x-queue-type": "quorum"} if _KIND == _broker.AMQP else None
try:
    _QUEUE_NAMES = [*_config.queues(), "dead_letter"]
except _ConfigurationError as _exc:   # e.g. a provider plugin that cannot be imported
    print(f"error: {_exc}", file=_sys.stderr)
    raise SystemExit(2) from None
task_queues = [Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True,
                     queue_arguments=_QUEUE_ARGUMENTS)
               for name in _QUEUE_NAMES]
task_create_missing_queues = False
task_default_queue = "dead_letter"
task_default_exchange = "dead_letter"
task_default_routing_key = "dead_letter"
task_routes = {"outbox.dead_letter": {"queue": "dead_letter"}}

broker_connection_retry_on_startup = True
# Logging is configured by outbox.logs (tasks connects Celery's setup_logging signal), which
# adds each delivery's context (provider, message_id, attempt, correlation_id) with a filter:
# no custom fields here, so any app loading this file (a benchmark's own) logs as usual.
