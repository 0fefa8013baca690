"""The outbox's ``Publisher`` for Celery: one ``outbox.deliver`` message per row, on the
provider's queue, carrying only the row id (label shown in Flower via ``argsrepr``).

On RabbitMQ every publish uses **publisher confirms**: it returns once the broker has the
message in its quorum queue, and raises if the broker refuses it (``MessageNacked``), so a
row is marked queued only when its message is in a queue. Confirms are switched on for the
publisher's own connections only, not in ``broker_transport_options``: there they would
apply to a worker's event connection too, which its event loop reads (for heartbeats) while
pool threads may flush task events on it; a confirm wait in a pool thread then races the
loop for the ack frame. (With confirms on every connection, one worker in about 25 test
runs stalled with its prefetch unacknowledged and ignored SIGTERM; never since.)

Every publish is bounded: it waits at most ``PUBLISH_TIMEOUT_S`` for the socket write and
for the broker's confirm, and a broker that is down, refuses or never answers is retried
``RETRY_POLICY`` times (each connection attempt bounded by Celery's
``broker_connection_timeout``, 4 s) and then raises — about 20 s at worst, measured with a
broker that stops answering mid-connection. The caller (``outbox.dispatch``) then leaves the
rows due for the relay; nothing waits forever. (On Redis the same bound comes from the
socket timeouts in ``celeryconfig``.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from contextlib import contextmanager

from outbox.broker_url import AMQP, REDIS, broker_kind
from outbox.dispatch import MessageRef

# Seconds a publish may wait for the socket write and (RabbitMQ) the broker's confirm. A
# quorum queue confirms in milliseconds; a broker under a memory or disk alarm blocks
# publishers and never confirms: that must become an error, not a hung dispatch thread.
PUBLISH_TIMEOUT_S = 5.0
# Two more tries (reconnecting) within about a second, then the error reaches the caller.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1}


class CeleryPublisher:
    """Publishes through a pool of producers (pooled connections, not a client per call): the
    app's own on Redis, one of its own with publisher confirms on RabbitMQ.

    Messages are sent by task name (``send_task``), so any app configured from
    ``celeryconfig`` can publish them, whichever broker it is configured for.
    """

    def __init__(self, app=None):
        from . import app as default_app

        self.app = app or default_app
        self._lock = threading.Lock()
        self._pool = None   # (pid, ProducerPool) with confirms, made on first use
        self.broker_kind = broker_kind(self.app.conf.broker_url)   # "redis" or "amqp"
        self.confirms = self.broker_kind == AMQP

    @property
    def redis_broker_url(self) -> str | None:
        """The broker's URL when it is Redis, else None (RabbitMQ): for checks that only make
        sense on a Redis broker (a flushed or restarted Redis loses its queued messages)."""
        return self.app.conf.broker_url if self.broker_kind == REDIS else None

    @contextmanager
    def producer(self):
        """A producer for a burst of publishes (confirming on RabbitMQ)."""
        if not self.confirms:
            with self.app.producer_or_acquire() as producer:
                yield producer
            return
        with self._confirming_pool().acquire(block=True, timeout=PUBLISH_TIMEOUT_S) as producer:
            yield producer

    def _confirming_pool(self):
        from kombu.pools import ProducerPool

        with self._lock:
            if self._pool is None or self._pool[0] != os.getpid():   # none yet, or forked
                connection = self.app.connection_for_write(
                    transport_options={"confirm_publish": True})
                limit = self.app.conf.broker_pool_limit or 10
                self._pool = (os.getpid(), ProducerPool(connection.Pool(limit), limit=limit,
                                                        Producer=self.app.amqp.Producer))
            return self._pool[1]

    def close(self) -> None:
        """Close the confirming connections (tests; a process that exits needs not)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool[1].force_close_all()
            pool[1].connections.force_close_all()

    def publish(self, refs: Sequence[MessageRef]) -> None:
        with self.producer() as producer:
            for ref in refs:
                self.app.send_task(
                    "outbox.deliver", args=[ref.id], queue=ref.provider,
                    routing_key=ref.provider, argsrepr=ref.label, kwargsrepr="",
                    producer=producer, ignore_result=True, retry=True,
                    retry_policy=RETRY_POLICY, timeout=PUBLISH_TIMEOUT_S,
                    confirm_timeout=PUBLISH_TIMEOUT_S)

    def publish_dead_letter(self, message_id: str, label: str) -> None:
        with self.producer() as producer:
            self.app.send_task(
                "outbox.dead_letter", args=[message_id], argsrepr=label, kwargsrepr="",
                queue="dead_letter", routing_key="dead_letter", producer=producer,
                ignore_result=True, retry=True, retry_policy=RETRY_POLICY,
                timeout=PUBLISH_TIMEOUT_S, confirm_timeout=PUBLISH_TIMEOUT_S)

    def depth(self, provider: str) -> int:
        """Messages waiting in ``provider``'s queue (``tasks.broker.queue_depth``)."""
        from .broker import queue_depth

        return queue_depth(self.app, provider)

