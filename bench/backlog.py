"""``python -m bench backlog``: Redis memory with a large backlog pending and no worker.

The same ``N`` messages (default 100,000) are enqueued through ``enqueue`` on PostgreSQL, in
transactions of 1,000, with the real Celery publisher on a private Redis database, and the
relay then runs a few passes. Two runs in the same process:

* **bounded** (the default ``OUTBOX_RELAY_MAX_QUEUED``, 100 per provider): after-commit
  dispatch and the relay hand the broker at most that many; the rest waits as due rows;
* **unbounded** (the baseline: the cap raised past the count, which is what the outbox did
  before): every message goes to the broker at once. Run with ``--baseline-messages``
  (default 10,000: publishing 100,000 messages takes minutes), and its memory scaled
  linearly to ``N`` (a Redis list grows by the same bytes per message).

Prints the broker queue length and Redis ``used_memory`` growth of each, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import time

import sqlalchemy as sa

PG_ADMIN = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_DB_URL = os.environ.get("BENCH_BACKLOG_REDIS_URL", "redis://127.0.0.1:6379/6")


def _fresh_database(name: str) -> str:
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return sa.engine.make_url(PG_ADMIN).set(database=name).render_as_string(
        hide_password=False)


def _drop_database(name: str) -> None:
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def one_run(n: int, max_queued: int) -> dict:
    """Enqueue ``n`` with the given cap; returns queue length and Redis memory growth."""
    import redis

    from integrations.registry import supports_idempotency
    from outbox import dispatch, enqueue
    from outbox.config import RelaySettings
    from outbox.db import make_engine, make_sessionmaker
    from outbox.migrations import upgrade
    from outbox.relay import run_once
    from tasks.publisher import CeleryPublisher

    client = redis.Redis.from_url(REDIS_DB_URL)
    client.flushdb()
    name = "outbox_bench_backlog"
    url = _fresh_database(name)
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    os.environ["OUTBOX_RELAY_MAX_QUEUED"] = str(max_queued)
    dispatch.use_publisher(CeleryPublisher())
    before = client.info("memory")["used_memory"]
    started = time.perf_counter()
    try:
        for start in range(0, n, 1000):
            with sessions() as session:
                for i in range(start, min(n, start + 1000)):
                    enqueue(session, provider="payments", operation="charge",
                            payload={"amount": 100 + i % 1000, "currency": "usd"},
                            idempotency_key=f"backlog-{i}")
                session.commit()
        dispatch.dispatcher().flush(timeout_s=600)
        settings = RelaySettings(max_queued=max_queued, grace_s=0)
        for _ in range(3):
            run_once(engine, dispatch.dispatcher(), settings, idempotent=supports_idempotency)
        elapsed = time.perf_counter() - started
        waiting = client.llen("payments")
        grown = client.info("memory")["used_memory"] - before
    finally:
        engine.dispose()
        _drop_database(name)
        client.flushdb()
    return {"waiting": waiting, "grown_bytes": grown, "elapsed_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench backlog")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--baseline-messages", type=int, default=10_000)
    parser.add_argument("--smoke", action="store_true", help="2,000 messages")
    parser.add_argument("--quick", action="store_true", help="20,000 messages")
    args = parser.parse_args(argv)
    n = 2_000 if args.smoke else 20_000 if args.quick else args.messages
    os.environ["REDIS_URL"] = REDIS_DB_URL          # before tasks/celeryconfig are imported
    os.environ.pop("CELERY_BROKER_URL", None)
    from outbox.config import RelaySettings

    cap = RelaySettings().max_queued
    base_n = min(n, args.baseline_messages)
    bounded = one_run(n, cap)
    unbounded = one_run(base_n, base_n + 1)
    scaled = unbounded["grown_bytes"] * n / base_n
    ratio = bounded["grown_bytes"] / max(scaled, 1)
    print(f"backlog of {n:,} pending, no worker (PostgreSQL, Redis broker):")
    print(f"  bounded (max_queued {cap}):  {bounded['waiting']:>7,} in the broker, "
          f"Redis +{bounded['grown_bytes'] / 1e6:.2f} MB  ({bounded['elapsed_s']:.1f} s)")
    print(f"  unbounded (baseline):     {unbounded['waiting']:>7,} of {base_n:,} in the broker, "
          f"Redis +{unbounded['grown_bytes'] / 1e6:.2f} MB  ({unbounded['elapsed_s']:.1f} s); "
          f"for {n:,}: +{scaled / 1e6:.2f} MB")
    print(f"  memory ratio bounded/unbounded: {ratio:.4f}")
    ok = bounded["waiting"] <= cap and unbounded["waiting"] == base_n
    if not ok:
        print("  FAILED: the bounded run left more than max_queued in the broker")
    return 0 if ok else 1
