"""Shared fixtures: real PostgreSQL, SQLite, Redis, RabbitMQ and the sandbox provider.

A service that cannot be reached fails the test with what to start; nothing
is skipped silently.

The Celery broker is Redis unless a test asks for more with ``tests.harness.both_brokers``
(the ``broker`` fixture, parametrised indirectly): then it also runs with RabbitMQ (quorum
queues, publisher confirms) in a vhost of this test run's own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import pytest
import redis
import sqlalchemy as sa

from outbox.db import make_engine, make_sessionmaker
from outbox.migrations import upgrade
from tests.harness import PG_ADMIN_URL, RecordingPublisher, _pg_admin_engine


def _claim_redis_db() -> str:
    """A Redis database index of our own (15 down to 8), so parallel test runs never share one."""
    if os.environ.get("OUTBOX_TEST_REDIS_URL"):
        return os.environ["OUTBOX_TEST_REDIS_URL"]
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        for index in range(15, 7, -1):
            if client.set(f"outbox:test-db-lock:{index}", os.getpid(), nx=True, ex=3600):
                atexit.register(client.delete, f"outbox:test-db-lock:{index}")
                return f"redis://127.0.0.1:6379/{index}"
    except redis.RedisError:
        pass   # the redis_url fixture reports the unreachable server
    return "redis://127.0.0.1:6379/15"


REDIS_TEST_URL = _claim_redis_db()
# celeryconfig reads REDIS_URL when ``tasks`` is first imported: point it at the test database.
os.environ["REDIS_URL"] = REDIS_TEST_URL
# The test process's ``tasks.app`` publishes to that Redis; a test that runs on RabbitMQ gets
# an app of its own (the ``broker`` fixture), never a broker inherited from the shell.
os.environ.pop("CELERY_BROKER_URL", None)
# `make test` runs with the Makefile's demo settings exported (for `make run`): the crm demo
# client (which would put crm "in use", not connected: critical) and the webhooks allow-list
# are set by the tests that want them, never inherited.
for _name in [n for n in os.environ if n.startswith(("OUTBOX_CRM_", "SANDBOX_CRM_"))]:
    os.environ.pop(_name)
os.environ.pop("OUTBOX_WEBHOOKS_ALLOW_HOSTS", None)
AMQP_TEST_URL = os.environ.get("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

START_REDIS = ("redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' "
               "--appendonly no")
START_RABBITMQ = "rabbitmq-server -detached (or: make rabbitmq)"


@pytest.fixture
def pg_url():
    """A fresh, migrated PostgreSQL database for this test; dropped afterwards."""
    admin = _pg_admin_engine()
    name = f"outbox_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path):
    """A fresh, migrated SQLite file database for this test."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """Runs the test once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine):
    return make_sessionmaker(engine)


@pytest.fixture
def redis_url():
    """A flushed Redis database (index 15 by default) for this test."""
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_TEST_URL} ({type(exc).__name__}). "
                    f"Start it: {START_REDIS}", pytrace=False)
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


# ---- the Celery broker: Redis, or RabbitMQ for tests marked with harness.both_brokers -------

def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess | None:
    """Run ``rabbitmqctl -q ARGS``; None when there is no usable rabbitmqctl (not installed,
    not root, or a broker on another machine)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=60)
    return done if done.returncode == 0 else None


def _drop_stale_vhosts() -> None:
    """Remove ``outbox-test-<pid>`` vhosts of earlier runs on this machine that died."""
    listed = _rabbitmqctl("list_vhosts", "name")
    for name in (listed.stdout.split() if listed else []):
        pid = name.removeprefix("outbox-test-")
        if name.startswith("outbox-test-") and pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                _rabbitmqctl("delete_vhost", name)
            except PermissionError:
                pass


@pytest.fixture(scope="session")
def rabbitmq_url():
    """A RabbitMQ vhost of this test run's own (``outbox-test-<pid>``, made with rabbitmqctl
    and deleted at the end), so parallel runs never share a queue. Without a usable
    rabbitmqctl (a remote broker, not root), the vhost of ``OUTBOX_TEST_AMQP_URL`` itself;
    the ``broker`` fixture purges the queues before and after every test either way."""
    from kombu import Connection

    try:
        with Connection(AMQP_TEST_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0)
    except Exception as exc:
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_TEST_URL.split('@')[-1]} "
                    f"({type(exc).__name__}: {exc}). Start it: {START_RABBITMQ}", pytrace=False)
    parts = urlsplit(AMQP_TEST_URL)
    vhost = f"outbox-test-{os.getpid()}"
    local = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if local:
        _drop_stale_vhosts()
    if not (local and _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl(
            "set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")):
        yield AMQP_TEST_URL
        return
    yield parts._replace(path="/" + quote(vhost, safe="")).geturl()
    _rabbitmqctl("delete_vhost", vhost)


@dataclass
class BrokerUnderTest:
    """The Celery broker of one test: ``kind`` is "redis" or "rabbitmq"."""

    kind: str
    url: str
    app: object   # the Celery app that publishes to it from the test process

    @property
    def env(self) -> dict[str, str]:
        """What the processes of the test need to use this broker."""
        return {"CELERY_BROKER_URL": self.url} if self.kind == "rabbitmq" else {}

    def waiting(self, queue: str) -> int:
        """Messages in ``queue`` not yet handed to a worker."""
        if self.kind == "redis":
            client = redis.Redis.from_url(self.url)
            try:
                return client.llen(queue)
            finally:
                client.close()
        with self.app.connection_for_write() as conn:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count

    def purge(self) -> None:
        """Declare every queue of ours (RabbitMQ: as quorum queues) and empty it."""
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            for queue in self.app.amqp.queues.values():
                bound = queue.bind(channel)
                bound.declare()
                bound.purge()


@pytest.fixture
def broker(request, redis_url):
    """Redis (this run's database, flushed), or with ``indirect`` parametrisation
    "rabbitmq": this run's vhost with every queue of ours purged before and after."""
    kind = getattr(request, "param", "redis")
    if kind == "redis":
        from tasks import app

        yield BrokerUnderTest("redis", redis_url, app)
        return
    assert kind == "rabbitmq", kind
    from tests.harness import celery_app_for

    url = request.getfixturevalue("rabbitmq_url")
    app = celery_app_for(url)
    under_test = BrokerUnderTest("rabbitmq", url, app)
    under_test.purge()
    yield under_test
    under_test.purge()
    app.close()


@pytest.fixture
def client(redis_url):
    """A Redis client on this test's flushed database (``redis_url``); closed afterwards."""
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def sandbox():
    """The sandbox providers on an ephemeral loopback port."""
    from sandbox.server import SandboxServer

    server = SandboxServer(host="127.0.0.1", port=0, payments_api_key="sk_test_outbox")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def publisher():
    """Install a RecordingPublisher as the process's publisher for this test."""
    from outbox import dispatch

    recorder = RecordingPublisher()
    dispatch.use_publisher(recorder)
    yield recorder
    dispatch.use_publisher(None)


@pytest.fixture
def inbound_redis(redis_url, monkeypatch):
    """The inbound rate limit and breaker (``tasks.runtime.inbound_protection``) in this
    test's Redis database, not in the default one a running ``make run`` uses."""
    from tasks import runtime

    monkeypatch.setenv("REDIS_URL", redis_url)
    runtime.inbound_protection.cache_clear()
    yield
    runtime.inbound_protection.cache_clear()


# ---- end-to-end: real workers, relay and sandbox -------------------------------------------

@pytest.fixture
def stack_env(db_url, redis_url, broker, sandbox):
    """Environment that points every process at this test's database, Redis, broker and
    sandbox."""
    return {
        **broker.env,
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "OUTBOX_PAYMENTS_BASE_URL": sandbox.url,
        "OUTBOX_PAYMENTS_API_KEY": "sk_test_outbox",
        "OUTBOX_PAYMENTS_TIMEOUT": "5",
        "OUTBOX_EMAIL_BASE_URL": sandbox.url,
        "OUTBOX_EMAIL_API_KEY": "sk_test_outbox",
        "OUTBOX_EMAIL_FROM": "Outbox Tests <tests@example.com>",
        "OUTBOX_EMAIL_TIMEOUT": "5",
        "OUTBOX_RELAY_GRACE": "0.5",
        # `make test` runs with the Makefile's demo settings exported (for `make run`): the
        # shop's handlers are not these processes' to import.
        "OUTBOX_HANDLERS": "",
    }


@pytest.fixture
def procs(stack_env, tmp_path):
    """Starts worker/relay/Flower subprocesses for the test and always stops them."""
    from tests.harness import Processes

    processes = Processes(stack_env, tmp_path)
    yield processes
    processes.stop_all()


@pytest.fixture
def celery_publisher(stack_env, broker, monkeypatch):
    """The real Celery publisher, installed for this process, publishing to the test's broker."""
    from outbox import dispatch
    from tasks.publisher import CeleryPublisher

    for name, value in stack_env.items():
        if name != "CELERY_BROKER_URL":   # the broker's own app has it; tasks.app stays on Redis
            monkeypatch.setenv(name, value)
    assert broker.app.conf.broker_url == broker.url
    publisher = CeleryPublisher(broker.app)
    dispatch.use_publisher(publisher)
    yield publisher
    dispatch.dispatcher().flush()
    dispatch.use_publisher(None)
    publisher.close()


# ---- the CLI, in-process --------------------------------------------------------------------

@pytest.fixture
def provider_env(monkeypatch, redis_url):
    """Providers configured (keys, this test's Redis), as the workers would be: status is ok."""
    from integrations import registry

    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("OUTBOX_PAYMENTS_API_KEY", "sk_test_cli")
    monkeypatch.setenv("OUTBOX_EMAIL_API_KEY", "sk_test_cli")
    registry.reset()
    yield
    registry.reset()


@pytest.fixture
def cli_db(sqlite_url, monkeypatch, publisher, provider_env):
    """DATABASE_URL points at a fresh SQLite file; sessions on it for arranging and checking."""
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("OUTBOX_ACTOR", "tester@ci")
    engine = make_engine(sqlite_url)
    yield make_sessionmaker(engine)
    engine.dispose()


# ---- TLS servers on loopback (tests/tls_servers.py) ------------------------------------------

@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory):
    """A CA and server certificates made with the openssl command, once per module."""
    from tests.tls_servers import make_certs

    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def loopback():
    """Starts loopback servers for the test and always stops them."""
    from tests.tls_servers import loopback_servers

    with loopback_servers() as start:
        yield start
