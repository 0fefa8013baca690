"""Real processes for end-to-end tests: Celery workers, the relay, Flower, as subprocesses.

Each process gets an environment pointing at the test's database, Redis and
sandbox. Tests wait on conditions (``wait_until``), never on fixed sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Runs a test with the Redis broker on SQLite and PostgreSQL, and with RabbitMQ (quorum
# queues, publisher confirms) on PostgreSQL: the broker does not depend on the database.
# conftest's ``db_url`` and ``broker`` fixtures take these parameters.
both_brokers = pytest.mark.parametrize(
    ("db_url", "broker"),
    [("sqlite", "redis"), ("postgresql", "redis"), ("postgresql", "rabbitmq")],
    indirect=True, ids=["sqlite-redis", "postgresql-redis", "postgresql-rabbitmq"])


def celery_app_for(broker_url: str):
    """A Celery app configured from ``celeryconfig`` as a process whose broker is
    ``broker_url`` is configured (celeryconfig reads the environment when it is loaded)."""
    import importlib.util

    from celery import Celery

    spec = importlib.util.find_spec("celeryconfig")
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("CELERY_BROKER_URL")
    os.environ["CELERY_BROKER_URL"] = broker_url
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["CELERY_BROKER_URL"]
        else:
            os.environ["CELERY_BROKER_URL"] = saved
    app = Celery("tasks", set_as_current=False)
    app.config_from_object(module)
    return app


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout_s: float = 30.0, interval_s: float = 0.05,
               message: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {message}")
        time.sleep(interval_s)


class Processes:
    """Starts and always stops the subprocesses of one test."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], *, cpus: set[int] | None = None,
              **env) -> subprocess.Popen:
        """Start ``args`` with this test's environment plus ``env``, its output in the log
        ``name``; on the CPUs ``cpus`` only, when given."""
        log = open(self.log_dir / f"{name}.log", "ab")
        if cpus:   # taskset (util-linux) execs the command: the pid stays the command's
            args = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *args]
        proc = subprocess.Popen(args, cwd=ROOT, env={**self.env, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def worker(self, name: str = "w1", queues: str = "payments,dead_letter", pool: str = "threads",
               concurrency: int = 4, cpus: set[int] | None = None, **env) -> subprocess.Popen:
        """A Celery worker; returns once it is consuming (its log says 'ready')."""
        proc = self.start(name, [str(BIN / "celery"), "-A", "tasks", "worker", "-Q", queues,
                                 "-P", pool, "-c", str(concurrency), "-n", f"{name}@%h",
                                 "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
                          cpus=cpus, **env)
        wait_until(lambda: "ready." in self.log(name) or proc.poll() is not None, 60,
                   message=f"worker {name} to be ready")
        assert proc.poll() is None, f"worker {name} exited:\n{self.log(name)[-3000:]}"
        return proc

    def flower(self, user: str, password: str, worker: str = "w1") -> str:
        """Flower (through ``tasks.flower``) with basic auth on a free loopback port; returns
        its URL once it answers and has heard ``worker``'s heartbeat (events sent before
        Flower listens are lost, so a test must not produce any earlier)."""
        import requests

        port = free_port()
        proc = self.start("flower", [sys.executable, "-m", "tasks.flower", f"--port={port}"],
                          FLOWER_BASIC_AUTH=f"{user}:{password}")
        url = f"http://127.0.0.1:{port}"

        def healthy():
            assert proc.poll() is None, f"flower exited:\n{self.log('flower')[-3000:]}"
            try:
                return requests.get(url + "/healthcheck", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(healthy, 30, 0.1, message="Flower /healthcheck")

        def receiving_events():
            metrics = requests.get(url + "/metrics", timeout=5).text
            return any(line.startswith(f'flower_worker_online{{worker="{worker}@')
                       and line.endswith(" 1.0") for line in metrics.splitlines())

        wait_until(receiving_events, 30, 0.2, message="Flower to receive the worker's events")
        return url

    def web(self, user: str, password: str, **env) -> str:
        """``outbox web`` on a free loopback port with these credentials; returns its URL
        once ``/health/live`` answers."""
        return self._served("web", OUTBOX_WEB_AUTH=f"{user}:{password}", **env)

    def inbound(self, cpus: set[int] | None = None, **env) -> str:
        """``outbox inbound`` (the webhook receiver) on a free loopback port; returns its
        URL once ``/health/live`` answers. Pass the webhook secrets in ``env``."""
        return self._served("inbound", cpus=cpus, **env)

    def _served(self, command: str, cpus: set[int] | None = None, **env) -> str:
        import requests

        port = free_port()
        proc = self.start(command, [str(BIN / "outbox"), command, "--port", str(port)],
                          cpus=cpus, **env)
        url = f"http://127.0.0.1:{port}"

        def live():
            assert proc.poll() is None, f"{command} exited:\n{self.log(command)[-3000:]}"
            try:
                return requests.get(url + "/health/live", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(live, 30, 0.1, message=f"outbox {command} /health/live")
        return url

    def sandbox(self, name: str = "sandbox") -> str:
        """The sandbox providers in a process of their own; returns the URL once it listens.

        For tests that time arrivals at the provider: the in-process sandbox shares the
        test's GIL, so whatever the test process does (its dispatch thread publishing, its
        polling) can delay a request's arrival timestamp and bunch arrivals together.
        """
        import re

        env = {"SANDBOX_PAYMENTS_API_KEY": self.env.get("OUTBOX_PAYMENTS_API_KEY", "")}
        proc = self.start(name, [sys.executable, "-m", "sandbox", "--port", "0"], **env)

        def listening():
            assert proc.poll() is None, f"sandbox exited:\n{self.log(name)[-2000:]}"
            match = re.search(r"listening on (http://\S+)", self.log(name))
            return match.group(1) if match else None

        return wait_until(listening, 20, message="the sandbox to listen")

    def relay(self, name: str = "relay", **env) -> subprocess.Popen:
        env.setdefault("OUTBOX_RELAY_POLL_INTERVAL", "0.2")
        return self.start(name, [str(BIN / "outbox"), "relay"], **env)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a worker's pool children too) and reap it."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                self.kill(proc, signal.SIGTERM)
        self.procs.clear()


def fail_claimed(session, claim, exc, *, now=None, policy=None, idempotent=True, rng=None):
    """Record ``exc`` as the failure of the claimed attempt, decided as the delivery task
    decides it (``outbox.decisions``); returns the Decision."""
    from outbox.clock import utcnow
    from outbox.decisions import decide, failure_from
    from outbox.lifecycle import record
    from outbox.retry import RetryPolicy

    now = now or utcnow()
    failure = failure_from(exc)
    decision = decide(failure, attempts=claim.attempts, rate_limited=claim.rate_limited_count,
                      budget_started_at=claim.budget_started_at, policy=policy or RetryPolicy(),
                      idempotent=idempotent, now=now, rng=rng)
    record(session, claim, failure, decision, now=now)
    return decision


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run the ``outbox`` CLI in-process; (exit code, stdout, stderr)."""
    from outbox import cli

    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---- shared by conftest and test modules (importing conftest itself would run it twice) ----

PG_ADMIN_URL = os.environ.get("OUTBOX_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
START_PG = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def _pg_admin_engine():
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("select 1")
    except Exception as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({type(exc).__name__}). "
                    f"Start it: {START_PG}", pytrace=False)
    return engine


class RecordingPublisher:
    """A Publisher that records what it was asked to publish (core tests without a broker)."""

    def __init__(self):
        self.published = []
        self.dead_letters = []
        self.fail = False

    def publish(self, refs):
        if self.fail:
            raise ConnectionError("broker down")
        self.published.extend(refs)

    def publish_dead_letter(self, message_id, label):
        if self.fail:
            raise ConnectionError("broker down")
        self.dead_letters.append((message_id, label))

    @property
    def ids(self):
        return [r.id for r in self.published]


@contextmanager
def served(app) -> Iterator[str]:
    """``app`` on a real uvicorn server on a free loopback port, in a thread; its base URL."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, message="the server to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
