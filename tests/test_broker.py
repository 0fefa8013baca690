"""The Celery broker: Redis by default, RabbitMQ when ``CELERY_BROKER_URL`` names one.

Configuration (which URL, quorum queues, no confirms on worker connections), the publisher
on RabbitMQ (confirmed, a refusal raises, a broker that stops answering raises within a
bound on both brokers), and what a worker does at start on RabbitMQ. The end-to-end
delivery, crash and dead-letter tests run on both brokers (``tests.harness.both_brokers``).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from kombu import Exchange, Queue

import schemas
from outbox.broker_url import broker_kind, broker_url, redis_broker_url
from outbox.dispatch import MessageRef
from tests.harness import BIN, ROOT, celery_app_for

QUEUES = sorted([*schemas.operations(), "inbound", "dead_letter"])   # config.queues()


# ---- which broker ---------------------------------------------------------------------------

@pytest.mark.parametrize(("environ", "url"), [
    ({}, "redis://localhost:6379/0"),
    ({"REDIS_URL": "redis://r:6379/3"}, "redis://r:6379/3"),
    ({"REDIS_URL": "redis://r:6379/3", "CELERY_BROKER_URL": "amqp://u:p@mq:5672/v"},
     "amqp://u:p@mq:5672/v"),
    ({"REDIS_URL": "redis://r:6379/3", "CELERY_BROKER_URL": "  "}, "redis://r:6379/3"),
])
def test_the_broker_is_celery_broker_url_else_redis_url(environ, url):
    assert broker_url(environ) == url


@pytest.mark.parametrize(("url", "kind"), [
    ("redis://h/0", "redis"), ("rediss://h/0", "redis"), ("redis+socket:///tmp/r.sock", "redis"),
    ("amqp://h//", "amqp"), ("AMQPS://h//", "amqp"), ("pyamqp://h//", "amqp"),
    ("sqs://", "sqs"), ("nonsense", ""),
])
def test_broker_kind(url, kind):
    assert broker_kind(url) == kind


def test_redis_broker_url_is_none_on_rabbitmq():
    """What the relay asks before a Redis-only check (a flushed Redis broker)."""
    assert redis_broker_url({"REDIS_URL": "redis://r/1"}) == "redis://r/1"
    assert redis_broker_url({"REDIS_URL": "redis://r/1", "CELERY_BROKER_URL": "amqp://mq//"}) is None


# ---- celeryconfig on each broker ------------------------------------------------------------

def test_celeryconfig_on_rabbitmq_declares_durable_quorum_queues_and_keeps_the_names():
    redis_app = celery_app_for("redis://127.0.0.1:6379/0")
    rabbit_app = celery_app_for("amqp://guest:guest@127.0.0.1:5672/x")
    try:
        on_redis = redis_app.amqp.queues
        on_rabbit = rabbit_app.amqp.queues
        assert sorted(on_rabbit) == sorted(on_redis) == QUEUES
        for name in QUEUES:
            queue = on_rabbit[name]
            assert queue.queue_arguments == {"x-queue-type": "quorum"}
            assert queue.durable and not queue.auto_delete and not queue.exclusive
            assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == \
                   (on_redis[name].exchange.name, on_redis[name].exchange.type,
                    on_redis[name].routing_key) == (name, "direct", name)
            assert not on_redis[name].queue_arguments
        conf = rabbit_app.conf
        assert conf.broker_url == "amqp://guest:guest@127.0.0.1:5672/x"
        assert conf.worker_detect_quorum_queues is True
        assert conf.worker_consumer == "tasks.consumer:Consumer"
        # Confirms only on the publisher's own connections (tasks.publisher), and no Redis
        # options on RabbitMQ.
        assert conf.broker_transport_options == {}
        assert redis_app.conf.broker_transport_options == {
            "visibility_timeout": 3600, "socket_timeout": 5, "socket_connect_timeout": 4}
        assert redis_app.conf.worker_consumer == "celery.worker.consumer:Consumer"
        assert conf.task_acks_late and conf.task_reject_on_worker_lost
        assert conf.worker_prefetch_multiplier == 1
    finally:
        redis_app.close()
        rabbit_app.close()


def test_the_worker_consumer_leaves_out_only_native_delayed_delivery():
    from celery.worker.consumer import Consumer as CeleryConsumer

    from tasks.consumer import DELAYED_DELIVERY_STEP, Consumer

    celery_steps = CeleryConsumer.Blueprint.default_steps
    assert DELAYED_DELIVERY_STEP in celery_steps
    assert Consumer.Blueprint.default_steps == [s for s in celery_steps
                                                if s != DELAYED_DELIVERY_STEP]


# ---- the publisher on RabbitMQ ---------------------------------------------------------------

@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_rabbitmq_publishes_are_confirmed_and_a_refusal_raises(broker):
    """The publisher's connections confirm; a message the broker refuses (a full queue with
    reject-publish: a classic one, whose limit is exact) raises instead of vanishing, so
    the rows stay due for the relay."""
    from kombu.exceptions import OperationalError

    from tasks.publisher import CeleryPublisher

    full = Queue("outbox-test-full", Exchange("outbox-test-full", type="direct"),
                 routing_key="outbox-test-full",
                 queue_arguments={"x-queue-type": "classic", "x-max-length": 0,
                                  "x-overflow": "reject-publish"})
    broker.app.amqp.queues.add(full)
    publisher = CeleryPublisher(broker.app)
    try:
        publisher.publish([MessageRef("01TESTCONFIRMED", "payments", "charge")])
        assert broker.waiting("payments") == 1
        with publisher.producer() as producer:
            assert producer.connection.transport_options["confirm_publish"] is True
        assert publisher.broker_kind == "amqp" and publisher.redis_broker_url is None
        with pytest.raises(OperationalError):
            publisher.publish([MessageRef("01TESTREFUSED", "outbox-test-full", "x")])
    finally:
        publisher.close()
        with broker.app.connection_for_write() as conn:
            full.bind(conn.default_channel).delete()


class FreezingProxy:
    """A TCP proxy to ``port`` on loopback that, once frozen, swallows what the server sends
    and leaves new connections unanswered: a broker that stops answering without closing."""

    def __init__(self, port: int):
        self.target = port
        self.frozen = threading.Event()
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.frozen.is_set():
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            self.sockets.append(server)
            for a, b, swallow in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pipe, args=(a, b, swallow), daemon=True).start()

    def _pipe(self, a, b, swallow):
        try:
            while data := a.recv(65536):
                if not (swallow and self.frozen.is_set()):
                    b.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
def test_a_broker_that_stops_answering_makes_publish_raise_within_a_bound(broker, monkeypatch):
    """Connected, then the broker goes silent: the publish raises (bounded: write and confirm
    timeouts, then reconnects that time out), it never hangs. Timeouts shortened here."""
    from urllib.parse import urlsplit

    from kombu.exceptions import OperationalError

    from tasks import publisher as publisher_module

    parts = urlsplit(broker.url)
    proxy = FreezingProxy(parts.port or (6379 if broker.kind == "redis" else 5672))
    app = celery_app_for(parts._replace(netloc=f"{parts.netloc.rsplit('@', 1)[0]}@"
                                        f"127.0.0.1:{proxy.port}" if "@" in parts.netloc
                                        else f"127.0.0.1:{proxy.port}").geturl())
    app.conf.broker_connection_timeout = 1
    if broker.kind == "redis":
        app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                             "socket_timeout": 1, "socket_connect_timeout": 1}
    monkeypatch.setattr(publisher_module, "PUBLISH_TIMEOUT_S", 1.0)
    publisher = publisher_module.CeleryPublisher(app)
    try:
        publisher.publish([MessageRef("01TESTWARM", "payments", "charge")])   # connected
        proxy.frozen.set()
        started = time.monotonic()
        with pytest.raises(OperationalError):
            publisher.publish([MessageRef("01TESTFROZEN", "payments", "charge")])
        assert time.monotonic() - started < 15
    finally:
        publisher.close()
        proxy.close()
        app.close()


# ---- a worker on RabbitMQ ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("db_url", "broker"), [("sqlite", "rabbitmq")], indirect=True)
def test_a_worker_on_rabbitmq_skips_delayed_delivery_and_refuses_a_classic_queue(
        broker, stack_env, procs):
    """A worker starts without Celery's celery_delayed_* queues; a queue left as a classic
    queue stops the next worker at start with one line naming it (exit 2)."""
    import subprocess

    from amqp.exceptions import NotFound

    procs.worker(queues="payments")
    with broker.app.connection_for_write() as conn:
        with pytest.raises(NotFound):
            conn.channel().queue_declare("celery_delayed_0", passive=True)
        channel = conn.channel()
        channel.queue_delete("email")
        channel.queue_declare("email", durable=True, auto_delete=False)   # classic
    try:
        done = subprocess.run(
            [str(BIN / "celery"), "-A", "tasks", "worker", "-Q", "email", "-P", "threads",
             "-c", "1", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env={**procs.env, "PYTHONUNBUFFERED": "1"}, capture_output=True,
            text=True, timeout=60)
    finally:
        with broker.app.connection_for_write() as conn:
            conn.channel().queue_delete("email")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-2000:]
    [line] = [x for x in output.splitlines() if "refusing to start" in x]
    assert "RabbitMQ queue 'email'" in line and "quorum" in line
    assert "Traceback" not in output
