"""The three measurements. Each returns plain dicts (printed by ``report``, saved as JSON)."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.orm import Session, sessionmaker

from outbox import Message, MessageStatus, enqueue
from outbox.clock import utcnow
from outbox.dispatch import dispatcher

from . import baseline
from .stack import BenchError, Stack, cpu_snapshot, wait_until

# The application's own table: a "request" inserts one order and (maybe) enqueues its charge.
app_metadata = MetaData()
orders = Table(
    "bench_orders", app_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ref", String(64), nullable=False),
    Column("amount", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

POLL_S = 0.1


@dataclass
class Ctx:
    stack: Stack
    engine: Engine
    sessions: sessionmaker[Session]


def _charge(i: int) -> dict:
    return {"amount": 100 + i % 10_000, "currency": "usd"}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(q / 100 * len(ordered) + 0.4999))
    return ordered[min(rank, len(ordered)) - 1]


def _delivered(ctx: Ctx, prefix: str) -> tuple[int, int]:
    """(delivered, dead) rows whose key starts with ``prefix``."""
    with ctx.sessions() as s:
        rows = dict(s.execute(
            select(Message.status, func.count()).where(Message.idempotency_key.like(prefix + "%"))
            .group_by(Message.status)).all())
    return rows.get(MessageStatus.DELIVERED, 0), rows.get(MessageStatus.DEAD, 0)


def _last_delivered_at(ctx: Ctx, prefix: str) -> float:
    with ctx.sessions() as s:
        last = s.scalar(select(func.max(Message.delivered_at))
                        .where(Message.idempotency_key.like(prefix + "%")))
    if isinstance(last, str):  # defensive: SQLite hands back text on some drivers
        last = datetime.fromisoformat(last)
    return last.replace(tzinfo=UTC).timestamp()


def _wait_pipeline(ctx: Ctx, prefix: str, n: int, timeout_s: float) -> None:
    def done():
        ctx.stack.check_alive()
        delivered, dead = _delivered(ctx, prefix)
        if dead:
            raise BenchError(f"{dead} message(s) dead-lettered during the benchmark; "
                             f"see {ctx.stack.log_dir}/worker.log")
        return delivered >= n
    wait_until(done, timeout_s, POLL_S, what=f"{n} pipeline deliveries ({prefix}*)")


def _wait_effects(ctx: Ctx, n: int, timeout_s: float) -> dict:
    def done():
        ctx.stack.check_alive()
        stats = ctx.stack.sandbox_stats()
        return stats if stats["effects_total"] >= n else None
    return wait_until(done, timeout_s, POLL_S, what=f"{n} effects at the sandbox")


def setup_app_table(ctx: Ctx) -> None:
    app_metadata.create_all(ctx.engine)


# ---- warm-up -----------------------------------------------------------------

def warm_up(ctx: Ctx, n: int = 64) -> None:
    """Both paths once (connections, imports, provider clients) before anything is timed."""
    ctx.stack.sandbox_reset()
    for i in range(n):
        baseline.publish(f"w-bare-{i}", 100 + i)
    with ctx.sessions() as s:
        for i in range(n):
            enqueue(s, provider="payments", operation="charge", payload=_charge(i),
                    idempotency_key=f"w-pipe-{i}")
        s.commit()
    _wait_pipeline(ctx, "w-pipe-", n, 60)
    _wait_effects(ctx, 2 * n, 60)


# ---- (a) throughput ------------------------------------------------------------

def _reset(ctx: Ctx, provider_latency_s: float) -> None:
    ctx.stack.sandbox_reset()
    if provider_latency_s:
        ctx.stack.sandbox_latency(provider_latency_s)


def pipeline_throughput(ctx: Ctx, n: int, tag: str, batch: int = 100,
                        provider_latency_s: float = 0.0) -> dict:
    """Enqueue ``n`` charges in transactions of ``batch``; time until the last row is delivered."""
    prefix = f"a-{tag}-"
    _reset(ctx, provider_latency_s)
    log0 = ctx.stack.log_size("worker")
    cpu0 = cpu_snapshot(ctx.stack)
    t0 = time.time()
    for start in range(0, n, batch):
        with ctx.sessions() as s:
            for i in range(start, min(n, start + batch)):
                enqueue(s, provider="payments", operation="charge", payload=_charge(i),
                        idempotency_key=f"{prefix}{i}")
            s.commit()
    t_submitted = time.time()
    _wait_pipeline(ctx, prefix, n, timeout_s=max(60.0, n / 20))
    t_end = _last_delivered_at(ctx, prefix)
    stats = _wait_effects(ctx, n, 10)
    cpu1 = cpu_snapshot(ctx.stack)
    result = _throughput_result("pipeline", n, t0, t_submitted, t_end, stats, cpu0, cpu1)
    # Broker messages the worker took per delivered row: > 1 means duplicates (e.g. the relay
    # re-sent rows the dispatch thread had not yet marked queued); each costs a claim.
    time.sleep(0.3)  # let the worker's log catch up
    # One line per deliver message the worker took: its outcome, or "duplicate or stale".
    result["tasks_received"] = ctx.stack.log_count("worker", log0, r"outbox\.delivery: ")
    return result


def baseline_throughput(ctx: Ctx, n: int, tag: str, provider_latency_s: float = 0.0) -> dict:
    """Publish ``n`` bare tasks; time until the sandbox has answered the last one."""
    prefix = f"a-{tag}-"
    _reset(ctx, provider_latency_s)
    cpu0 = cpu_snapshot(ctx.stack)
    t0 = time.time()
    for i in range(n):
        baseline.publish(f"{prefix}{i}", _charge(i)["amount"])
    t_submitted = time.time()
    _wait_effects(ctx, n, timeout_s=max(60.0, n / 20))
    cpu1 = cpu_snapshot(ctx.stack)
    stats = ctx.stack.sandbox_stats(log=True)
    t_end = max(e["t_end"] or e["t"] for e in stats["request_log"])
    return _throughput_result("baseline", n, t0, t_submitted, t_end, stats, cpu0, cpu1)


def _throughput_result(side: str, n: int, t0: float, t_submitted: float, t_end: float,
                       stats: dict, cpu0: dict, cpu1: dict) -> dict:
    effects = stats["effects_by_key"]
    duplicated = sum(1 for c in effects.values() if c > 1)
    if stats["effects_total"] != n or duplicated:
        raise BenchError(f"{side}: {stats['effects_total']} effects for {n} messages, "
                         f"{duplicated} key(s) duplicated")
    elapsed = t_end - t0
    return {"side": side, "n": n, "elapsed_s": round(elapsed, 3),
            "submit_s": round(t_submitted - t0, 3), "per_s": round(n / elapsed, 1),
            "max_in_flight": stats["max_in_flight"],
            # CPU milliseconds each process spent per message over the whole phase
            "cpu_ms_per_msg": {k: round((cpu1[k] - cpu0[k]) * 1000 / n, 3)
                               for k in cpu0 if k in cpu1},
            "statuses": stats["status_counts"]}


# ---- (b) marginal request cost ---------------------------------------------------

def marginal_cost(ctx: Ctx, iterations: int, warmup: int = 300) -> dict:
    """Time one simulated request transaction three ways, interleaved (no worker running):

    app      with sessions() as s: INSERT bench_orders; s.commit()
    enqueue  with sessions() as s: INSERT bench_orders; enqueue(...); s.commit()
    delay    with sessions() as s: INSERT bench_orders; s.commit()   then bare_charge.delay(...)

    The after-commit dispatch runs on a background thread; its work for the previous
    request is drained (``dispatcher().flush()``) outside the timed section, so no
    request is timed while that thread competes for the GIL or the database.
    """
    variants = ("app", "enqueue", "delay")
    samples: dict[str, list[float]] = {v: [] for v in variants}
    drain: list[float] = []
    flush = dispatcher().flush
    gc.collect()
    for i in range(warmup + iterations):
        order = variants[i % 3:] + variants[:i % 3]   # rotate, so no variant always goes first
        for variant in order:
            key = f"b-{variant}-{i}"
            amount = 100 + i % 10_000
            t0 = time.perf_counter()
            with ctx.sessions() as s:
                s.execute(insert(orders).values(ref=key, amount=amount, created_at=utcnow()))
                if variant == "enqueue":
                    enqueue(s, provider="payments", operation="charge",
                            payload={"amount": amount, "currency": "usd"}, idempotency_key=key)
                s.commit()
            if variant == "delay":
                baseline.publish(key, amount)
            t1 = time.perf_counter()
            if variant == "enqueue":
                flush()
                if i >= warmup:
                    drain.append(time.perf_counter() - t1)
            if i >= warmup:
                samples[variant].append(t1 - t0)
    med = {v: statistics.median(samples[v]) * 1e6 for v in variants}
    p90 = {v: percentile(samples[v], 90) * 1e6 for v in variants}
    m_enqueue = med["enqueue"] - med["app"]
    m_delay = med["delay"] - med["app"]
    return {
        "iterations": iterations,
        "median_us": {v: round(x, 1) for v, x in med.items()},
        "p90_us": {v: round(x, 1) for v, x in p90.items()},
        "marginal_enqueue_us": round(m_enqueue, 1),
        "marginal_delay_us": round(m_delay, 1),
        "dispatch_thread_median_us": round(statistics.median(drain) * 1e6, 1),
        "ratio": round(m_enqueue / m_delay, 3) if m_delay > 0 else float("nan"),
    }


class _NoPublisher:
    """Publishes nothing: the dispatch thread then only marks rows queued."""

    def publish(self, refs) -> None:
        pass


def marginal_without_broker(ctx: Ctx, iterations: int, warmup: int = 200) -> dict:
    """Diagnostic: (b)'s app vs enqueue variants again, with the dispatch thread's broker
    publish stubbed out. The difference to (b) is what the background publish, which starts
    at commit, costs the request while it is still closing its session (GIL contention)."""
    from outbox.dispatch import use_publisher

    samples: dict[str, list[float]] = {"app": [], "enqueue": []}
    use_publisher(_NoPublisher())
    try:
        flush = dispatcher().flush
        for i in range(warmup + iterations):
            for variant in (("app", "enqueue") if i % 2 else ("enqueue", "app")):
                key = f"b-nopub-{variant}-{i}"
                t0 = time.perf_counter()
                with ctx.sessions() as s:
                    s.execute(insert(orders).values(ref=key, amount=100, created_at=utcnow()))
                    if variant == "enqueue":
                        enqueue(s, provider="payments", operation="charge",
                                payload={"amount": 100 + i % 10_000, "currency": "usd"},
                                idempotency_key=key)
                    s.commit()
                t1 = time.perf_counter()
                flush()
                if i >= warmup:
                    samples[variant].append(t1 - t0)
    finally:
        use_publisher(None)   # back to the entry-point publisher
    med = {v: statistics.median(x) * 1e6 for v, x in samples.items()}
    return {"median_us": {v: round(x, 1) for v, x in med.items()},
            "marginal_enqueue_us": round(med["enqueue"] - med["app"], 1)}


def clean_after_marginal(ctx: Ctx) -> None:
    """Nothing consumed (b)'s messages: drop them from the broker and the outbox."""
    dispatcher().flush()
    ctx.stack.purge_queue()
    with ctx.sessions() as s:
        s.execute(delete(Message).where(Message.idempotency_key.like("b-%")))
        s.execute(delete(orders))
        s.commit()


def enqueue_breakdown(ctx: Ctx, iterations: int = 1500) -> dict:
    """Where an enqueue's time goes, by timing it whole and its public parts on their own
    (medians, µs): intake (``outbox.payload.canonical_json``), the schema
    (``schemas.validate_operation``), the digest, and what a read-back of the row would cost
    (``session.get``; enqueue returns the row without one)."""
    import hashlib

    import schemas
    from outbox.config import max_payload_bytes
    from outbox.payload import canonical_json

    payload = {"amount": 1999, "currency": "usd"}
    cap = max_payload_bytes()
    parts: dict[str, list[float]] = {
        "enqueue, whole call (INSERT included)": [], "intake: canonical JSON + checks": [],
        "schema validation": [], "sha256 digest": [],
        "session.get (the read-back enqueue avoids)": []}
    with ctx.sessions() as s:
        for i in range(iterations):
            t0 = time.perf_counter()
            enqueue(s, provider="payments", operation="charge", payload=payload,
                    idempotency_key=f"breakdown-{i}")
            t1 = time.perf_counter()
            canonical = canonical_json(payload, max_bytes=cap)
            t2 = time.perf_counter()
            schemas.validate_operation("payments", "charge", payload)
            t3 = time.perf_counter()
            hashlib.sha256(f"charge\n{canonical}".encode()).hexdigest()
            t4 = time.perf_counter()
            for key, start_, end_ in (("enqueue, whole call (INSERT included)", t0, t1),
                                      ("intake: canonical JSON + checks", t1, t2),
                                      ("schema validation", t2, t3), ("sha256 digest", t3, t4)):
                parts[key].append(end_ - start_)
        s.rollback()
    with ctx.sessions() as s:
        # the identity map is empty, so session.get() SELECTs
        for message_id in s.scalars(select(Message.id).limit(500)).all():
            t0 = time.perf_counter()
            s.get(Message, message_id)
            parts["session.get (the read-back enqueue avoids)"].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1e6, 1) for k, v in parts.items() if v}


# ---- (c) commit-to-provider latency ----------------------------------------------

def latency(ctx: Ctx, side: str, rate: float, duration_s: float, tag: str) -> dict:
    """Open loop at ``rate`` requests/s: one app transaction per request (plus enqueue, or
    plus a bare ``.delay()`` after commit); latency = sandbox arrival − commit time."""
    prefix = f"c-{tag}-"
    n = max(10, int(rate * duration_s))
    interval = 1.0 / rate
    ctx.stack.sandbox_reset()
    committed: dict[str, float] = {}
    lags: list[float] = []
    start = time.perf_counter() + 0.05
    for i in range(n):
        target = start + i * interval
        now = time.perf_counter()
        if target > now:
            time.sleep(target - now)
        lags.append(time.perf_counter() - target)
        key = f"{prefix}{i}"
        amount = 100 + i % 10_000
        with ctx.sessions() as s:
            s.execute(insert(orders).values(ref=key, amount=amount, created_at=utcnow()))
            if side == "pipeline":
                enqueue(s, provider="payments", operation="charge",
                        payload={"amount": amount, "currency": "usd"}, idempotency_key=key)
            s.commit()
        committed[key] = time.time()
        if side == "baseline":
            baseline.publish(key, amount)
    if side == "pipeline":
        _wait_pipeline(ctx, prefix, n, 60)
    _wait_effects(ctx, n, 60)
    arrivals: dict[str, float] = {}
    for entry in ctx.stack.sandbox_stats(log=True)["request_log"]:
        arrivals.setdefault(entry["key"], entry["t"])
    values = [(arrivals[k] - t) * 1000 for k, t in committed.items() if k in arrivals]
    if len(values) != n:
        raise BenchError(f"latency {side}: {n - len(values)} request(s) never reached the sandbox")
    return {"side": side, "rate_per_s": round(rate, 1), "n": n,
            "p50_ms": round(percentile(values, 50), 2), "p90_ms": round(percentile(values, 90), 2),
            "p99_ms": round(percentile(values, 99), 2), "max_ms": round(max(values), 2),
            "schedule_lag_p99_ms": _ms(percentile(lags, 99))}
