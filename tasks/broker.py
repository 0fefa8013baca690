"""What the broker can tell the outbox: how many messages wait in a queue.

``outbox.relay`` compares it with the rows it marked queued to find messages the broker
lost (a flushed or restarted Redis, a relay or worker killed mid-hand-off), and dispatch
uses it to keep each queue's backlog bounded.
"""

from __future__ import annotations

from functools import cache

import redis


@cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def queue_depth(app, queue: str) -> int:
    """Messages waiting (not yet delivered to a worker) in ``queue``.

    On Redis, the length of the queue's list (Celery uses one list per queue; messages a
    worker has taken are no longer in it). On RabbitMQ, the queue's ready-message count
    from a passive declare. Raises on broker failure.
    """
    url = app.conf.broker_url
    if url.split("://", 1)[0] in ("redis", "rediss"):
        return int(_redis(url).llen(queue))
    with app.pool.acquire(block=True, timeout=5) as connection:   # the producer pool's
        return connection.default_channel.queue_declare(queue=queue, passive=True).message_count
