"""The machinery of the chaos and soak runs: a private Redis, a scratch PostgreSQL database,
a supervisor that restarts killed processes, a producer of business transactions, fault
injectors, and the figures read off the sandbox afterwards.

Everything listens on 127.0.0.1 only. Every process is started in its own session and is
stopped (group and all) by ``ChaosStack.close()``; the private Redis server and the
scratch database go with it.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.stats import max_in_window

from .stack import BIN, ROOT, BenchError, Stack, wait_until

DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
PAYMENTS_PATH = "/v1/payment_intents"


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def note(message: str) -> None:
    """Progress on stderr (stdout carries the one line of figures)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- a Redis server of our own -------------------------------------------------------

class PrivateRedis:
    """``redis-server`` on a free loopback port, no persistence: flushing it or killing and
    restarting it touches nobody else's data."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="outbox-chaos-redis-")
        self.log_path = log_dir / "redis.log"
        self.proc: subprocess.Popen | None = None
        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("redis-server is not installed (apt-get install redis-server)")
        self.exe = exe

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--logfile", str(self.log_path),
             "--protected-mode", "yes"],
            cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_until(self.ping, 15, 0.05, what=f"private redis-server on port {self.port}")

    def ping(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5,
                             socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"private redis-server exited: see {self.log_path}") from None
            return False
        finally:
            client.close()

    def flushall(self) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        client.flushall()
        client.close()

    def kill(self) -> None:
        """SIGKILL: with no persistence everything it held is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- the stack with a supervisor ---------------------------------------------------------

@dataclass
class Fault:
    """One injected fault. ``t`` is when the system could start recovering from it (the
    kill, the flush, the moment Redis/PostgreSQL/the provider were back)."""

    kind: str
    t: float
    detail: str = ""


class ChaosStack(Stack):
    """``bench.stack.Stack`` on PostgreSQL and a private Redis, with supervised processes.

    Supervised processes (the relay, the workers) are restarted when they exit, as a
    process supervisor would (``kill`` restarts at once; an unexpected exit after 1 s).
    """

    def __init__(self, name: str, workers: int, threads: int, log_dir: Path,
                 extra_env: dict[str, str] | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.redis = PrivateRedis(log_dir)
        super().__init__(self.redis.url, threads, log_dir)
        self.name = name
        self.n_workers = workers
        self.extra_env = dict(extra_env or {})
        self.supervised: dict[str, list[str]] = {}
        self.spawned_at: dict[str, float] = {}
        self.restarts: dict[str, int] = {}
        self.unexpected_exits: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.faults: list[Fault] = []
        self.rss_samples: list[tuple[float, dict[str, int | None]]] = []
        self.load_samples: list[float] = []   # the machine's 1-minute load average (shared!)
        self._admin = None

    # --- services ---------------------------------------------------------------------

    def start_services(self) -> None:
        os.environ.setdefault("BENCH_DATABASE_URL", DEFAULT_PG_URL)
        self.redis.start()
        self.start_sandbox()
        self.make_database()
        # Before anything imports ``tasks``: celeryconfig reads REDIS_URL at import time.
        os.environ.update(self.env())

    def env(self) -> dict[str, str]:
        env = super().env()
        env["OUTBOX_PAYMENTS_MAX_CONCURRENCY"] = str(self.n_workers * self.concurrency)
        env["CELERY_BROKER_URL"] = self.redis_url   # the private Redis is the broker too
        # This tree's code, also for console scripts (``outbox``, ``celery``) whose editable
        # install may point at another checkout (see ``bench.chaos --at``).
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *(x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                          if x and x != str(ROOT))])
        env.update(self.extra_env)
        return env

    def admin(self):
        """An AUTOCOMMIT engine on the server's admin database (not the scratch one)."""
        if self._admin is None:
            import sqlalchemy as sa

            self._admin = sa.create_engine(self._pg_admin_url, isolation_level="AUTOCOMMIT",
                                           pool_pre_ping=True)
        return self._admin

    # --- processes ----------------------------------------------------------------------

    def _start(self, name: str, args: list[str], **extra: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (kept open by the child)
        env = {**os.environ, **self.env(), **extra}
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        with self._lock:
            self.procs[name] = proc
            self.spawned_at[name] = time.time()
        return proc

    def worker_args(self, name: str) -> list[str]:
        return [str(BIN / "celery"), "-A", "tasks", "worker", "-Q", "payments", "-n",
                f"{self.name}-{name}@%h", "-P", "threads", "-c", str(self.concurrency),
                "--loglevel", "INFO", "--without-mingle", "--without-gossip"]

    def supervise(self, name: str, args: list[str]) -> subprocess.Popen:
        with self._lock:
            self.supervised[name] = args
            self.restarts.setdefault(name, 0)
            self.unexpected_exits.setdefault(name, 0)
            return self._start(name, args)

    def start_system(self, relay: bool = True) -> None:
        """The workers (waiting until each consumes), the relay, and the supervisor thread."""
        for i in range(1, self.n_workers + 1):
            self.supervise(f"worker{i}", self.worker_args(f"worker{i}"))
        for i in range(1, self.n_workers + 1):
            self.wait_ready(f"worker{i}")
        if relay:
            self.supervise("relay", [str(BIN / "outbox"), "relay"])
        self._supervisor = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._supervisor.start()

    def _watch(self) -> None:
        next_sample = 0.0
        while not self._stop.wait(0.25):
            if time.time() >= next_sample:   # memory of every supervised process, for the record
                next_sample = time.time() + 5
                self.rss_samples.append((round(time.time(), 1), {
                    name: rss_bytes(self.pid(name)) for name in list(self.supervised)}))
                self.load_samples.append(os.getloadavg()[0])
            with self._lock:
                for name, args in self.supervised.items():
                    proc = self.procs.get(name)
                    if proc is not None and proc.poll() is not None \
                            and time.time() - self.spawned_at[name] > 1.0:
                        self.unexpected_exits[name] += 1
                        note(f"{name} exited with {proc.returncode}; restarting it")
                        self._start(name, args)

    def kill(self, name: str, restart: bool = True) -> None:
        """SIGKILL ``name``'s process group; start it again at once (as a supervisor would)."""
        with self._lock:
            proc = self.procs.get(name)
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
            if restart:
                self.restarts[name] += 1
                self._start(name, self.supervised[name])

    def oldest_worker(self) -> str:
        with self._lock:
            names = [n for n in self.supervised if n.startswith("worker")]
            return min(names, key=lambda n: self.spawned_at[n])

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop_supervisor(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(5)

    def close(self) -> None:
        self.stop_supervisor()
        if self._admin is not None:
            self._admin.dispose()
        try:
            super().close()
        finally:
            self.redis.close()

    # --- faults ---------------------------------------------------------------------------

    def record_fault(self, kind: str, t: float | None = None, detail: str = "") -> Fault:
        fault = Fault(kind, time.time() if t is None else t, detail)
        self.faults.append(fault)
        return fault

    def redis_flush(self) -> Fault:
        self.redis.flushall()
        return self.record_fault("redis_flush")

    def redis_restart(self, down_s: float) -> Fault:
        """Kill the Redis server (no persistence: its data is gone) and start a new one on
        the same port after ``down_s``; the fault counts from the moment it answers again."""
        self.redis.kill()
        time.sleep(down_s)
        self.redis.start()
        return self.record_fault("redis_restart", detail=f"down {down_s:g}s")

    def pg_outage(self, down_s: float) -> Fault:
        """PostgreSQL gone for ``down_s`` for this database only: new connections refused
        (``ALLOW_CONNECTIONS false``) and every existing one terminated, then allowed again.
        The shared server itself is not restarted: other people use it."""
        db = self._pg_name
        with self.admin().connect() as conn:
            if down_s > 0:
                conn.exec_driver_sql(f'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS false')
            killed = conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %(db)s AND pid <> pg_backend_pid()", {"db": db}).scalar()
        if down_s > 0:
            time.sleep(down_s)
            with self.admin().connect() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS true')
        return self.record_fault("pg_outage", detail=f"{killed} connections killed, "
                                                      f"down {down_s:g}s")

    def provider_down(self) -> int:
        """Every payments request answered 503 until ``provider_up``; returns the rule id."""
        r = self.http.post(self.sandbox_url + "/_sandbox/faults", timeout=10,
                           json={"fault": "down", "mode": "503", "path": PAYMENTS_PATH})
        r.raise_for_status()
        return r.json()["id"]

    def provider_up(self, rule_id: int) -> Fault:
        self.http.delete(f"{self.sandbox_url}/_sandbox/faults/{rule_id}",
                         timeout=10).raise_for_status()
        return self.record_fault("provider_503_end")

    # --- the database ---------------------------------------------------------------------

    def table_bytes(self) -> int:
        """Bytes on disk of the outbox tables with their indexes and TOAST."""
        import sqlalchemy as sa

        with self._engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "WHERE c.relname IN ('outbox_messages', 'outbox_attempts', 'outbox_audit')"
            )).scalar())

    def status_counts(self, prefix: str = "") -> dict[str, int]:
        import sqlalchemy as sa

        from outbox import Message

        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(Message.status, sa.func.count())
                                .where(Message.idempotency_key.like(prefix + "%"))
                                .group_by(Message.status)).all()
        return {status: n for status, n in rows}

    def keys_in_table(self, prefix: str) -> set[str]:
        import sqlalchemy as sa

        from outbox import Message

        with self._engine.connect() as conn:
            return set(conn.execute(sa.select(Message.idempotency_key)
                                    .where(Message.idempotency_key.like(prefix + "%"))).scalars())

    def undelivered(self, keys: Iterable[str]) -> dict[str, int]:
        """Status counts of the rows of ``keys`` (those the provider never acted on)."""
        import sqlalchemy as sa

        from outbox import Message

        keys = list(keys)
        out: dict[str, int] = {}
        with self._engine.connect() as conn:
            for start in range(0, len(keys), 1000):
                rows = conn.execute(sa.select(Message.status, sa.func.count())
                                    .where(Message.idempotency_key.in_(keys[start:start + 1000]))
                                    .group_by(Message.status)).all()
                for status, n in rows:
                    out[status] = out.get(status, 0) + n
        return out


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---- the application: business transactions ----------------------------------------------

@dataclass
class Producer:
    """A web application's requests: each is one transaction that inserts an order and
    enqueues its charge, committed (or, for ``rollback_ratio`` of them, rolled back).

    ``rate`` transactions per second (None: as fast as possible); ``batch`` > 1 enqueues that
    many charges per transaction (a backlog made at once; no rollbacks then). A transaction that fails
    (database down) is retried with the same idempotency key until it commits; its commit
    time is the successful one. ``lost_dispatch_ratio`` of the commits lose their
    after-commit dispatch, as if the application process died right after committing: only
    the relay can deliver those.
    """

    sessions: Callable
    prefix: str
    n: int
    rate: float | None
    rollback_ratio: float = 0.0
    lost_dispatch_ratio: float = 0.0
    customer: str | None = None
    batch: int = 1
    seed: int = 7
    commits: dict[str, float] = field(default_factory=dict)
    rolled_back: set[str] = field(default_factory=set)
    db_errors: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    error: BaseException | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Producer:
        self._thread = threading.Thread(target=self._guarded, name="producer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise BenchError(f"producer failed: {type(self.error).__name__}: {self.error}")

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            self.finished_at = time.time()

    def _run(self) -> None:
        rng = random.Random(self.seed)
        self.started_at = t0 = time.time()
        for start in range(0, self.n, self.batch):
            if self._stop.is_set():
                return
            if self.rate:
                delay = t0 + start / self.rate - time.time()
                if delay > 0:
                    time.sleep(delay)
            items = []
            for i in range(start, min(self.n, start + self.batch)):
                rollback = rng.random() < self.rollback_ratio
                lose = not rollback and rng.random() < self.lost_dispatch_ratio
                items.append((i, rollback, lose))
            if self.batch == 1:
                self._transaction(items, rollback=items[0][1], lose=items[0][2])
            else:
                self._transaction(items, rollback=False, lose=False)

    def _transaction(self, items: list[tuple[int, bool, bool]], rollback: bool,
                     lose: bool) -> None:
        """One transaction for ``items``, retried with the same keys until it commits."""
        from sqlalchemy import exc as sa_exc
        from sqlalchemy import insert

        from outbox import enqueue
        from outbox.clock import utcnow
        from outbox.dispatch import _SESSION_KEY

        from .measure import orders

        keys = [f"{self.prefix}{i}" for i, _, _ in items]
        while not self._stop.is_set():
            try:
                with self.sessions() as session:
                    for (i, _, _), key in zip(items, keys, strict=True):
                        payload = {"amount": 100 + i % 10_000, "currency": "usd"}
                        if self.customer:
                            payload["customer"] = self.customer
                        session.execute(insert(orders).values(
                            ref=key, amount=payload["amount"], created_at=utcnow()))
                        enqueue(session, provider="payments", operation="charge",
                                payload=payload, idempotency_key=key)
                    if rollback:
                        session.rollback()
                        self.rolled_back.update(keys)
                        return
                    if lose:
                        session.info.pop(_SESSION_KEY, None)
                    session.commit()
                    now = time.time()
                    for key in keys:
                        self.commits[key] = now
                    return
            except (sa_exc.DBAPIError, sa_exc.InvalidRequestError):
                self.db_errors += 1
                self._stop.wait(0.2)


# ---- figures ---------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Observed:
    """What the provider saw, per idempotency key, read from the sandbox's request log."""

    effects_by_key: dict[str, int]
    requests_by_key: dict[str, int]
    arrivals: list[float]             # every payments request, sorted
    first_effect: dict[str, float]    # key → arrival of its first 2xx (the effect)
    first_ack: dict[str, float]       # key → when the provider answered that request
    status_counts: dict[str, int]
    log_truncated: bool

    @classmethod
    def read(cls, stack: Stack) -> Observed:
        from sandbox.state import LOG_CAP

        stats = stack.sandbox_stats(log=True)
        log = stats.get("request_log", [])
        first_effect: dict[str, float] = {}
        first_ack: dict[str, float] = {}
        arrivals = []
        for entry in log:
            if entry["path"] != PAYMENTS_PATH:
                continue
            arrivals.append(entry["t"])
            status = entry["status"]
            if isinstance(status, int) and 200 <= status < 300:
                key = entry["key"]
                if key not in first_effect or entry["t"] < first_effect[key]:
                    first_effect[key] = entry["t"]
                    first_ack[key] = entry["t_end"] or entry["t"]
        arrivals.sort()
        return cls(stats["effects_by_key"], stats["requests_by_key"], arrivals, first_effect,
                   first_ack, stats["status_counts"], len(log) >= LOG_CAP)


def recover_by_fault(faults: list[Fault], commits: dict[str, float],
                     effect_at: dict[str, float], rate: float) -> list[dict]:
    """Each fault's recovery (see ``bench.chaos``'s docstring for recover_s).

    For a fault at ``t``: the affected messages are those committed by ``t`` whose effect
    had not reached the provider by ``t``; recovery is the time from ``t`` until the last of
    them reached the provider, less the time the provider's rate limit needs for that many
    (``len / rate``, their "own time"); infinite if one never arrived.
    """
    out = []
    for fault in faults:
        affected = [k for k, t in commits.items()
                    if t <= fault.t and effect_at.get(k, math.inf) > fault.t]
        last = max((effect_at.get(k, math.inf) for k in affected), default=fault.t)
        recover = max(0.0, last - fault.t - len(affected) / rate) if affected else 0.0
        out.append({"kind": fault.kind, "t": fault.t, "affected": len(affected),
                    "recover_s": recover})
    return out


@dataclass
class Figures:
    """The one line of a scenario."""

    scenario: str
    lost: int = 0
    dup: int = 0
    recover_s: float = 0.0
    max_1s: int = 0
    p99_ms: float = float("nan")
    rss_growth: float | None = None
    table_bytes: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    per_fault: list[dict] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list, repr=False)

    def must(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def line(self) -> str:
        rss = "n/a" if self.rss_growth is None else f"{self.rss_growth * 100:+.1f}%"
        rec = "inf" if math.isinf(self.recover_s) else f"{self.recover_s:.1f}"
        p99 = "n/a" if math.isnan(self.p99_ms) else f"{self.p99_ms:.0f}"
        head = (f"{self.scenario:<15} {'PASS' if not self.failures else 'FAIL'}  lost={self.lost} "
                f"dup={self.dup} recover_s={rec} max_1s={self.max_1s} p99_ms={p99} "
                f"rss_growth={rss} table={self.table_bytes / 1e6:.1f}MB")
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        tail = f"  FAILED: {'; '.join(self.failures)}" if self.failures else ""
        return f"{head} | {extra}{tail}"

    def as_dict(self) -> dict:
        return {"scenario": self.scenario, "pass": not self.failures, "lost": self.lost,
                "dup": self.dup, "recover_s": self.recover_s, "max_1s": self.max_1s,
                "p99_ms": self.p99_ms, "rss_growth": self.rss_growth,
                "table_bytes": self.table_bytes, "extra": self.extra, "failures": self.failures,
                "per_fault": self.per_fault}


def delivery_figures(fig: Figures, stack: ChaosStack, producer: Producer, observed: Observed,
                     rate: float, ack: bool = False) -> list[str]:
    """Fill lost, dup, recover_s, max_1s, p99 (commit → provider, or → its answer with
    ``ack``) and the table size from what the provider saw; returns the lost keys."""
    commits = producer.commits
    lost = [k for k in commits if observed.effects_by_key.get(k, 0) == 0]
    fig.lost = len(lost)
    fig.dup = sum(observed.effects_by_key.get(k, 0) - 1 for k in commits
                  if observed.effects_by_key.get(k, 0) > 1)
    # Effects under keys nobody committed (a rolled-back transaction's, say) are duplicates
    # of nothing: count them as duplicates too.
    fig.dup += sum(n for k, n in observed.effects_by_key.items()
                   if k.startswith(producer.prefix) and k not in commits)
    per_fault = recover_by_fault(stack.faults, commits, observed.first_effect, rate)
    fig.recover_s = max((f["recover_s"] for f in per_fault), default=0.0)
    backlog = max((f["affected"] for f in per_fault), default=0)
    fig.per_fault = per_fault
    fig.max_1s = max_in_window(observed.arrivals, 1.0)
    reached = observed.first_ack if ack else observed.first_effect
    latencies = [reached[k] - t for k, t in commits.items() if k in reached]
    fig.p99_ms = percentile(latencies, 99) * 1000 if latencies else float("nan")
    fig.latencies = latencies
    fig.table_bytes = stack.table_bytes()
    fig.extra["commits"] = len(commits)
    if latencies:
        fig.extra["max_lat_s"] = round(max(latencies), 1)
    fig.extra["backlog"] = backlog
    if len({f["kind"] for f in per_fault}) > 1 and fig.recover_s > 0:
        worst = max(per_fault, key=lambda f: f["recover_s"])
        fig.extra["worst_fault"] = worst["kind"]
    fig.extra["faults"] = len(stack.faults)
    if stack.load_samples:   # other people's work on this machine slows ours: say how much
        fig.extra["load"] = f"{sum(stack.load_samples) / len(stack.load_samples):.1f}/{os.cpu_count()}cpu"
    if observed.log_truncated:
        fig.extra["log"] = "TRUNCATED"
    if lost:
        fig.extra["undelivered"] = ",".join(f"{s}:{n}" for s, n in
                                            sorted(stack.undelivered(lost).items())) or "no-row"
    return lost


def wait_delivered(stack: ChaosStack, keys: Iterable[str], deadline: float,
                   what: str = "deliveries") -> bool:
    """Poll the sandbox until every key has an effect or ``deadline`` (epoch) passes."""
    keys = set(keys)
    while True:
        effects = stack.sandbox_stats(log=False)["effects_by_key"]
        missing = sum(1 for k in keys if effects.get(k, 0) == 0)
        if not missing:
            return True
        if time.time() > deadline:
            note(f"{missing} of {len(keys)} {what} still not at the provider at the deadline")
            return False
        time.sleep(0.5)


# ---- running on a commit, not on the working tree ------------------------------------------

def run_at(commit: str, module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` on ``commit``'s code: ``git archive`` into a temporary
    folder, this tree's ``bench/chaos*.py`` and ``bench/soak*.py`` laid over it, every process
    pointed at it with ``PYTHONPATH``. The working tree is not touched (others edit it while
    we measure). ``commit`` ``worktree`` freezes a copy of the working tree as it is now
    (tracked and untracked files, uncommitted changes included). Logs and results are
    copied to ``var/at-<commit>/``."""
    if commit == "worktree":
        sha = "worktree"
        head = subprocess.run(["git", "log", "--oneline", "-1"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        described = f"working tree copied {time.strftime('%H:%M:%S')} on top of {head}"
    else:
        sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        described = subprocess.run(["git", "log", "--oneline", "-1", sha], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix=f"outbox-at-{sha}-"))
    try:
        if commit == "worktree":
            files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                    "--exclude-standard"], cwd=ROOT, check=True,
                                   capture_output=True).stdout.decode().split("\0")
            for name in filter(None, files):
                src = ROOT / name
                if src.is_file():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, tmp / name)
        else:
            archive = subprocess.Popen(["git", "archive", sha], cwd=ROOT, stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", str(tmp)], stdin=archive.stdout, check=True)
            archive.wait()
        for pattern in ("chaos*.py", "soak*.py"):
            for path in (ROOT / "bench").glob(pattern):
                shutil.copy2(path, tmp / "bench" / path.name)
        env = {**os.environ, "PYTHONPATH": str(tmp), "OUTBOX_BENCH_COMMIT": described}
        note(f"running {module} on {sha} in {tmp}")
        code = subprocess.call([sys.executable, "-m", module, *argv], cwd=tmp, env=env)
        if (tmp / "var").exists():
            dest = ROOT / "var" / f"at-{sha}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(tmp / "var", dest)
            note(f"logs and results: {dest.relative_to(ROOT)}/")
        return code
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def code_version() -> str:
    """``git log --oneline -1`` of the code being run, with a note if the tree is dirty."""
    if os.environ.get("OUTBOX_BENCH_COMMIT"):
        return os.environ["OUTBOX_BENCH_COMMIT"] + " (exported copy)"
    head = subprocess.run(["git", "log", "--oneline", "-1"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head + (" + UNCOMMITTED CHANGES in the working tree" if dirty else "")
