"""The system under test: a scratch database, a dedicated Redis DB, the sandbox, worker, relay.

Every process is started in its own session (process group) and stopped — group
and all — by ``Stack.close()``, which ``run.main`` calls in ``finally``.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
API_KEY = "sk_test_bench_0123456789abcdef"
QUEUE = "payments"


class BenchError(RuntimeError):
    """The benchmark could not run (a service is missing, a process died, a timeout)."""


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


class Stack:
    """Owns the scratch resources and subprocesses of one benchmark run."""

    def __init__(self, redis_url: str, concurrency: int, log_dir: Path,
                 broker_url: str | None = None):
        self.redis_url = redis_url
        # The Celery broker when it is not that Redis (an ``amqp://`` RabbitMQ): the workers
        # and the bench process get it as CELERY_BROKER_URL; Redis stays the limiter store.
        self.broker_url = broker_url
        self.concurrency = concurrency
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.db_url = ""
        self.db_kind = ""
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._pg_admin_url: str | None = None
        self._pg_name: str | None = None
        self._engine = None
        self.sandbox_url = ""
        self.http = requests.Session()
        self.http.trust_env = False

    # --- services -----------------------------------------------------------

    def check_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise BenchError(f"Redis does not answer at {self.redis_url} ({type(exc).__name__}); "
                             "start it: make redis (or python scripts/ensure_redis.py)") from None
        client.flushdb()
        client.close()

    def check_broker(self) -> None:
        """A RabbitMQ broker (``broker_url``) answers; its payments queue is emptied."""
        if not self.broker_url:
            return
        from kombu import Connection

        try:
            with Connection(self.broker_url, connect_timeout=3) as conn:
                conn.ensure_connection(max_retries=1, interval_start=0)
        except Exception as exc:
            raise BenchError(f"the broker does not answer at {self.broker_url.split('@')[-1]} "
                             f"({type(exc).__name__}); start it (rabbitmq-server -detached)"
                             ) from None
        self.purge_queue()

    def purge_queue(self) -> None:
        if self.broker_url:
            from kombu import Connection

            with Connection(self.broker_url, connect_timeout=3) as conn:
                try:
                    conn.default_channel.queue_purge(QUEUE)
                except conn.channel_errors:   # not declared yet: nothing to purge
                    pass
            return
        import redis

        client = redis.Redis.from_url(self.redis_url)
        client.delete(QUEUE)
        client.close()

    def make_database(self) -> str:
        """A migrated scratch database: a temp SQLite file, or a fresh PostgreSQL database on
        the server of ``BENCH_DATABASE_URL`` (created here, dropped in ``close``)."""
        from outbox.migrations import upgrade

        pg = os.environ.get("BENCH_DATABASE_URL", "").strip()
        if pg:
            import sqlalchemy as sa

            self._pg_admin_url = pg
            self._pg_name = f"outbox_bench_{uuid.uuid4().hex[:10]}"
            admin = sa.create_engine(pg, isolation_level="AUTOCOMMIT")
            try:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'CREATE DATABASE "{self._pg_name}"')
            except Exception as exc:
                raise BenchError(f"cannot create a scratch database on BENCH_DATABASE_URL "
                                 f"({type(exc).__name__}: {exc})") from None
            finally:
                admin.dispose()
            self.db_url = (sa.engine.make_url(pg).set(database=self._pg_name)
                           .render_as_string(hide_password=False))
            self.db_kind = "postgresql"
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="outbox-bench-")
            self.db_url = f"sqlite:///{self._tmp.name}/outbox.db"
            self.db_kind = "sqlite"
        upgrade(self.db_url)
        return self.db_url

    def open_engine(self):
        """An SQLAlchemy engine on the scratch database; ``close`` disposes it first."""
        from outbox.db import make_engine

        self._engine = make_engine(self.db_url)
        return self._engine

    def env(self) -> dict[str, str]:
        """The environment every process of the system gets (the bench process too)."""
        return {
            "DATABASE_URL": self.db_url,
            "REDIS_URL": self.redis_url,
            **({"CELERY_BROKER_URL": self.broker_url} if self.broker_url else {}),
            "OUTBOX_PAYMENTS_BASE_URL": self.sandbox_url,
            "OUTBOX_PAYMENTS_API_KEY": API_KEY,
            "SANDBOX_PAYMENTS_API_KEY": API_KEY,
            "OUTBOX_PAYMENTS_MAX_CONCURRENCY": str(self.concurrency),
            "PYTHONUNBUFFERED": "1",
        }

    # --- processes ----------------------------------------------------------

    def _start(self, name: str, args: list[str], **extra: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (kept open by the child)
        env = {**os.environ, **self.env(), **extra}
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_size(self, name: str) -> int:
        path = self.log_dir / f"{name}.log"
        return path.stat().st_size if path.exists() else 0

    def log_count(self, name: str, since: int, pattern: str) -> int:
        """Matches of regex ``pattern`` in ``name``'s log after byte offset ``since``."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return 0
        with open(path, "rb") as f:
            f.seek(since)
            return len(re.findall(pattern, f.read().decode(errors="replace")))

    def start_sandbox(self) -> str:
        """``python -m sandbox --port 0`` in its own process (its own GIL); returns its URL."""
        env = {**os.environ, "SANDBOX_PAYMENTS_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "sandbox", "--port", "0"], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs["sandbox"] = proc
        deadline = time.monotonic() + 20
        line = b""
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                match = re.search(rb"listening on (http://\S+)", line)
                if match:
                    self.sandbox_url = match.group(1).decode()
                    return self.sandbox_url
        raise BenchError(f"sandbox did not start: {line.decode(errors='replace')}")

    def spawn_worker(self, name: str, *, app: str = "tasks", node: str | None = None,
                     options: tuple[str, ...] = (), queue: str = QUEUE,
                     **env: str) -> subprocess.Popen:
        """Start one Celery worker of ``app``, ``-P threads -c N`` on ``queue`` (payments),
        as node ``node`` (default ``<name>@%h``), without waiting for it (see ``wait_ready``)."""
        return self._start(name, [
            str(BIN / "celery"), "-A", app, "worker", "-Q", queue, "-n", node or f"{name}@%h",
            "-P", "threads", "-c", str(self.concurrency), "--loglevel", "INFO",
            "--without-mingle", "--without-gossip", *options], **env)

    def wait_ready(self, name: str) -> None:
        """Return once worker ``name`` is consuming (its log says 'ready'); raise if it exited."""
        proc = self.procs[name]
        wait_until(lambda: "ready." in self.log(name) or proc.poll() is not None, 60,
                   what=f"{name} to be ready")
        if proc.poll() is not None:
            raise BenchError(f"{name} exited:\n{self.log(name)[-2000:]}")

    def start_worker(self, name: str = "worker") -> None:
        """One Celery worker, ``-P threads -c N`` on the payments queue, importing the baseline."""
        self.spawn_worker(name, node=f"bench-{name}@%h", options=("-I", "bench.baseline"))
        self.wait_ready(name)

    def start_relay(self) -> None:
        """``outbox relay`` with its default settings (as the Procfile runs it)."""
        self._start("relay", [str(BIN / "outbox"), "relay"])

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-2000:]}")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        # the group may still hold children even if the leader exited
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.stdout is not None:
            proc.stdout.close()

    def stop_all(self, names: list[str]) -> None:
        """SIGTERM every group at once (warm shutdowns overlap), then reap each (SIGKILL if slow)."""
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name in names:
            self.stop(name)

    # --- the sandbox's control API ----------------------------------------------

    def sandbox_reset(self) -> None:
        self.http.post(self.sandbox_url + "/_sandbox/reset", timeout=10).raise_for_status()

    def sandbox_latency(self, delay_s: float) -> None:
        """Every payments request waits ``delay_s`` at the sandbox (until the next reset)."""
        self.http.post(self.sandbox_url + "/_sandbox/faults", timeout=10,
                       json={"fault": "latency", "delay_s": delay_s}).raise_for_status()

    def sandbox_stats(self, log: bool = False) -> dict:
        response = self.http.get(self.sandbox_url + "/_sandbox/stats",
                                 params={"log": "1" if log else "0"}, timeout=30)
        response.raise_for_status()
        return response.json()

    # --- teardown -------------------------------------------------------------

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        for name in ("relay", *[n for n in self.procs if n.startswith("worker")], "sandbox"):
            self.stop(name)
        for name in list(self.procs):
            self.stop(name)
        self.http.close()
        try:
            self.purge_queue()
        except Exception:  # Redis gone: nothing left to clean there
            pass
        if self._pg_name:
            import sqlalchemy as sa

            try:
                from outbox.dispatch import dispatcher

                dispatcher().flush(timeout_s=2)
                admin = sa.create_engine(self._pg_admin_url, isolation_level="AUTOCOMMIT")
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self._pg_name}" WITH (FORCE)')
                admin.dispose()
            except Exception as exc:
                print(f"bench: could not drop scratch database {self._pg_name}: {exc}",
                      file=sys.stderr)
        if self._tmp is not None:
            self._tmp.cleanup()


class _Timeout(BaseException):
    """``--max-seconds`` is over (SIGALRM)."""


def _on_alarm(signum, frame):
    raise _Timeout


def _on_term(signum, frame):
    raise SystemExit(143)


def run_guarded(prog: str, stack: Stack, max_seconds: int, body: Callable[[], int]) -> int:
    """Run a benchmark's ``body`` under a hard stop and always clean up after it.

    SIGALRM after ``max_seconds`` stops it (exit code 3), SIGTERM exits with 143, a
    ``BenchError`` is printed (exit code 2) — on stderr, after ``prog: ``. Whatever happens,
    pending publishes are flushed and ``stack`` is closed (engine, processes, scratch data).
    """
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.alarm(max_seconds)
    try:
        return body()
    except _Timeout:
        print(f"{prog}: stopped after --max-seconds={max_seconds}", file=sys.stderr)
        return 3
    except BenchError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)
        try:
            from outbox.dispatch import dispatcher

            dispatcher().flush(timeout_s=2)
        except Exception:
            pass
        stack.close()


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_snapshot(stack: Stack) -> dict[str, float]:
    """CPU seconds used so far by the bench process and each subprocess."""
    times = os.times()
    snap = {"bench": times.user + times.system}
    for name, proc in stack.procs.items():
        snap[name] = cpu_seconds(proc.pid)
    try:
        import redis

        client = redis.Redis.from_url(stack.redis_url)
        info = client.info("cpu")
        client.close()
        snap["redis"] = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except Exception:  # CPU accounting is a diagnostic; never fail the run for it
        pass
    return snap
