"""``python -m bench inbound``: the webhook receiver's acknowledgement time, and events
processed per second (issue 9).

(a) ``outbox inbound`` (verify, store in one transaction, answer) and a bare endpoint in
    the same framework (``bench.bare_receiver``: verify and answer, nothing stored), each
    in its own process, take signed ``payment_intent.succeeded`` webhooks at ``--rate``
    per second (open loop: each request is sent at its scheduled time, and its latency
    counts from then, so a backlog shows) for ``--seconds``, in alternating rounds. The
    figure is p50/p99 of ours ÷ the bare endpoint's; target p99 ≤ 50 ms at 200/s.
(b) The events (a) stored are then processed by one inbound worker (``-P threads -c 8``,
    the relay publishing, a handler writing one row per event): events per second from
    the worker's start to the last processed.

The database is a scratch SQLite file, or PostgreSQL with ``BENCH_DATABASE_URL``; Redis
DB 7 (``--redis-url``). ``--smoke``: tiny counts, proves it still runs (``make test``).
Results go to ``var/bench-inbound.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from integrations.signatures import sign_stripe

from .chaos_stack import free_port
from .measure import percentile
from .stack import BIN, ROOT, BenchError, Stack, run_guarded, wait_until

RESULTS = ROOT / "var" / "bench-inbound.json"
SECRET = "whsec_bench_inbound_0123456789abcdef"
TARGET_P99_MS = 50.0


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m bench inbound", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="webhooks per second")
    p.add_argument("--seconds", type=float, default=10.0, help="per round and side")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2,
                   help="outbox inbound's server processes (one per core)")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_INBOUND_REDIS_URL",
                                                         "redis://127.0.0.1:6379/7"))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--max-seconds", type=int, default=300)
    args = p.parse_args(argv)
    if args.smoke:
        args.rate, args.seconds, args.rounds, args.max_seconds = 50.0, 1.0, 1, 120
    return args


def _live(url: str) -> bool:
    try:
        return requests.get(url + "/health/live", timeout=1).ok
    except requests.ConnectionError:
        return False


def signed_event(name: str, secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    """A ``payment_intent.succeeded`` event ``evt_<name>`` (bytes) and its Stripe-signed
    headers."""
    body = json.dumps({"id": f"evt_{name}", "object": "event", "type": "payment_intent.succeeded",
                       "data": {"object": {"id": f"pi_{name}", "amount": 1000}}}).encode()
    return body, {"Stripe-Signature": sign_stripe(body, secret, int(time.time())),
                  "Content-Type": "application/json"}


def _load(url: str, rate: float, seconds: float, prefix: str) -> list[float]:
    """Open-loop: request i is due at start + i / rate; its latency counts from then."""
    n = int(rate * seconds)
    latencies: list[float] = [0.0] * n
    failures = []
    local = threading.local()

    def session() -> requests.Session:
        if not hasattr(local, "http"):
            local.http = requests.Session()
            local.http.trust_env = False
        return local.http

    def send(i: int, due: float) -> None:
        body, headers = signed_event(f"{prefix}_{i}")
        try:
            answer = session().post(url + "/webhooks/payments", data=body, headers=headers,
                                    timeout=30)
            if answer.status_code != 200:
                failures.append(answer.status_code)
        except requests.RequestException as exc:
            failures.append(type(exc).__name__)
        latencies[i] = time.perf_counter() - due

    with ThreadPoolExecutor(64) as pool:
        start = time.perf_counter() + 0.05
        for i in range(n):
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            pool.submit(send, i, due)
    if failures:
        raise BenchError(f"{len(failures)} webhook(s) not answered 200: {failures[:5]}")
    return latencies


def _pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of seconds, in ms (``bench.measure.percentile``)."""
    return percentile(values, q * 100) * 1000


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ.pop("CELERY_BROKER_URL", None)
    stack = Stack(args.redis_url, 8, ROOT / "var" / "bench-logs" / "inbound")

    def body() -> int:
        stack.check_redis()
        stack.make_database()
        os.environ.update(stack.env())
        engine = stack.open_engine()
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE bench_inbound_effects (event_id VARCHAR(64))")
        ours_port, bare_port = free_port(), free_port()
        stack._start("receiver", [str(BIN / "outbox"), "inbound", "--port", str(ours_port),
                                  "--workers", str(args.workers)],
                     OUTBOX_PAYMENTS_WEBHOOK_SECRET=SECRET)
        stack._start("bare", [sys.executable, "-m", "bench.bare_receiver", "--port",
                              str(bare_port)], BENCH_WEBHOOK_SECRET=SECRET)
        ours, bare = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{bare_port}"
        for name, url in (("receiver", ours), ("bare", bare)):
            wait_until(lambda u=url: _live(u), 30, what=f"{name} to answer")
        _load(ours, 20, 0.5, "warm"), _load(bare, 20, 0.5, "warm")

        results: dict = {"config": {"rate": args.rate, "seconds": args.seconds,
                                    "rounds": args.rounds, "database": stack.db_kind}}
        lat = {"bare": [], "ours": []}
        for r in range(args.rounds):
            print(f"inbound: round {r + 1}/{args.rounds}: {args.rate:g}/s for "
                  f"{args.seconds:g} s, bare then ours …", flush=True)
            lat["bare"] += _load(bare, args.rate, args.seconds, f"b{r}")
            lat["ours"] += _load(ours, args.rate, args.seconds, f"o{r}")
        figures = {side: {"p50_ms": round(_pct(v, .5), 2), "p99_ms": round(_pct(v, .99), 2),
                          "n": len(v)} for side, v in lat.items()}
        results["ack"] = figures

        with engine.connect() as conn:
            stored = conn.exec_driver_sql(
                "SELECT count(*) FROM outbox_messages WHERE provider = 'inbound'").scalar()
        print(f"inbound: processing the {stored} stored events with one worker …", flush=True)
        stack.spawn_worker("worker", queue="inbound", OUTBOX_HANDLERS="bench.inbound_handlers",
                           PYTHONPATH=str(ROOT))
        stack.wait_ready("worker")
        t0 = time.monotonic()   # from the worker ready and the relay starting
        stack.start_relay()

        def done() -> bool:
            with engine.connect() as conn:
                return conn.exec_driver_sql(
                    "SELECT count(*) FROM bench_inbound_effects").scalar() >= stored

        wait_until(done, max(60.0, stored / 20), 0.1, what="every event processed")
        elapsed = time.monotonic() - t0
        results["processing"] = {"events": stored, "elapsed_s": round(elapsed, 2),
                                 "per_s": round(stored / elapsed, 1)}

        o, b = figures["ours"], figures["bare"]
        met = o["p99_ms"] <= TARGET_P99_MS
        print()
        print(f"inbound ({stack.db_kind}, {args.rate:g} webhooks/s open loop, "
              f"{args.rounds} × {args.seconds:g} s per side{'; smoke' if args.smoke else ''})")
        print(f"{'':<36}{'p50':>10}{'p99':>10}")
        print(f"{'bare endpoint (verify, 200)':<36}{b['p50_ms']:>8.1f}ms{b['p99_ms']:>8.1f}ms")
        print(f"{'outbox inbound (verify, store, 200)':<36}{o['p50_ms']:>8.1f}ms"
              f"{o['p99_ms']:>8.1f}ms")
        print(f"{'ratio ours ÷ bare':<36}{o['p50_ms'] / b['p50_ms']:>10.2f}"
              f"{o['p99_ms'] / b['p99_ms']:>10.2f}   p99 target ≤ {TARGET_P99_MS:g} ms: "
              f"{'met' if met else 'MISSED'}")
        print(f"events processed: {stored} in {elapsed:.1f} s = "
              f"{results['processing']['per_s']:.1f}/s (one worker, -P threads -c 8, from its "
              "ready line and the relay's start, a handler writing one row each)")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {RESULTS.relative_to(ROOT)}")
        return 0

    return run_guarded("inbound", stack, args.max_seconds, body)
