"""The worker's consumer without Celery's native delayed delivery (RabbitMQ quorum queues).

On a broker with quorum queues, Celery (>= 5.5) starts a ``DelayedDelivery`` bootstep in
every worker: it declares 28 ``celery_delayed_*`` quorum queues and exchanges, tries to bind
each of our queues to them, and warns three times per start that direct exchanges cannot be
delayed. All of that serves ``countdown``/``eta``, which the outbox never uses (a retry's
time lives in the row's ``next_attempt_at``; the relay publishes it when due). So the
worker leaves that step out: no idle Raft groups on the broker, no misleading warnings.

``celeryconfig`` names this class (``worker_consumer``) when the broker is RabbitMQ.
"""

from __future__ import annotations

from celery.worker.consumer import Consumer as CeleryConsumer

DELAYED_DELIVERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class Consumer(CeleryConsumer):
    """Celery's consumer, minus the ``DelayedDelivery`` bootstep."""

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [step for step in CeleryConsumer.Blueprint.default_steps
                         if step != DELAYED_DELIVERY_STEP]
