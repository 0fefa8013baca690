"""Celery settings for integration-outbox (lowercase names only; read by ``tasks.app``).

Delivery safety: JSON only, late acknowledgement, re-queue when a worker process
dies, one message prefetched at a time. Retries are *not* timed by Celery
(no countdown/eta): the outbox row holds ``next_attempt_at`` and the relay
publishes it when due, so the Redis visibility timeout never re-runs a delayed task.
"""

import os

from kombu import Exchange, Queue

import schemas

broker_url = os.environ.get("REDIS_URL") or "redis://localhost:6379/0"
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
# An unacknowledged message is redelivered after this; the claim makes that harmless.
broker_transport_options = {"visibility_timeout": 3600}

# Flower needs events; sent events let Flower show tasks waiting in a queue.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

# One queue per provider (bulkheads) plus dead_letter; every queue is declared.
# Each queue has its own direct exchange and routing key, so a message reaches one queue only.
task_queues = [Queue(name, Exchange(name, type="direct"), routing_key=name)
               for name in [*sorted(schemas.operations()), "dead_letter"]]
task_create_missing_queues = False
task_default_queue = "dead_letter"
task_default_exchange = "dead_letter"
task_default_routing_key = "dead_letter"
task_routes = {"outbox.dead_letter": {"queue": "dead_letter"}}

broker_connection_retry_on_startup = True
# Logging is configured by outbox.logs (tasks connects Celery's setup_logging signal), which
# adds each delivery's context (provider, message_id, attempt, correlation_id) with a filter:
# no custom fields here, so any app loading this file (a benchmark's own) logs as usual.
