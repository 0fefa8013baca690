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

# A delivery is bounded by its HTTP timeouts; these limits are the backstop (prefork pool).
task_soft_time_limit = 80
task_time_limit = 90
# Must exceed task_time_limit: an unacknowledged message is redelivered after this.
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
worker_hijack_root_logger = True
# %(outbox_context)s: provider, message_id, attempt, correlation_id of the delivery running
# in this thread (tasks.logcontext), empty otherwise.
worker_log_format = (
    "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s %(outbox_context)s")
worker_task_log_format = (
    "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s "
    "%(outbox_context)s")
