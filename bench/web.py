"""``python -m bench web``: what the admin app's read paths cost on big tables (issue 8).

On PostgreSQL scratch databases built as ``bench scale`` builds them (``bench.scale.build``):

(a) a ``/metrics`` scrape and (b) a ``/health`` call on 1,000,000 messages and 5,000,000
    attempts (four 503 retries before each delivery), beside the same on 10,000 messages:
    p50 and p99 of ``--runs`` calls each, alternating; target p99 ≤ 250 ms on the large
    table. The attempts are rolled up into the totals first (``outbox.totals``), as the
    relay does every minute, so a scrape reads the totals plus the attempts since.
(c) the dead-letter page (``/dead-letters``, logged in) with 100,000 dead letters and a
    filter (provider and error class): p99 of the first page; target ≤ 300 ms.

Calls go through the real app (FastAPI, its middleware, templates, ``prometheus_client``)
in-process with its test client; the providers' live state is given (as in ``bench
scale``), so the figures are the database's and the app's, not Redis's.
``--smoke`` (tiny tables, seconds) only proves the benchmark still runs (``make test``).
Results go to ``var/bench-web.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from .measure import percentile
from .scale import DEFAULT_ADMIN_URL, FACTS, ROOT, Scratch, Shape, build, on_scratch

RESULTS = ROOT / "var" / "bench-web.json"
TARGET_SCRAPE_MS, TARGET_DEAD_PAGE_MS = 250.0, 300.0
USER, PASSWORD = "bench", "bench-password-0123"
RETRIES = 4   # failed attempts before each delivery: 5 attempts per delivered message


def _client(engine):
    from fastapi.testclient import TestClient

    import schemas
    from outbox.db import make_sessionmaker
    from web.admin import create_app
    from web.auth import WebAuth

    facts = {name: {**fact, "latency_baseline_ms": 1000.0} for name, fact in FACTS.items()}
    app = create_app(make_sessionmaker(engine),
                     WebAuth.from_env({"OUTBOX_WEB_AUTH": f"{USER}:{PASSWORD}"}),
                     facts=lambda: facts, operations=schemas.operations())
    client = TestClient(app)
    page = client.get("/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', page)[1]
    client.post("/login", data={"username": USER, "password": PASSWORD, "csrf": token})
    return client


def _timer(client, path: str, expect: int = 200) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        response = client.get(path)
        elapsed = time.perf_counter() - started
        if response.status_code not in (expect, 503):   # /health may be critical
            raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
        return elapsed
    return run


def _p(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of seconds, in ms (``bench.measure.percentile``)."""
    return round(percentile(values, q * 100) * 1000, 2)


def _roll_up(engine) -> int:
    from outbox import totals
    from outbox.clock import utcnow

    totals.roll_up(engine)
    return totals.roll_up(engine, now=utcnow() + totals.SETTLE + timedelta(seconds=1))


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m bench web", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=50, help="timed calls per side")
    p.add_argument("--database-url",
                   default=os.environ.get("BENCH_SCALE_DATABASE_URL")
                   or os.environ.get("BENCH_DATABASE_URL") or DEFAULT_ADMIN_URL)
    p.add_argument("--smoke", action="store_true", help="tiny tables: proves it still runs")
    p.add_argument("--keep", action="store_true", help="keep the scratch databases")
    p.add_argument("--max-seconds", type=int, default=900)
    args = p.parse_args(argv)
    if args.smoke:
        args.runs, args.max_seconds = 5, min(args.max_seconds, 180)
    return args


def main(argv: list[str] | None = None) -> int:
    return on_scratch("web", _args(argv), _run)


def _run(args, scratch: Scratch) -> int:
    from outbox.clock import utcnow

    started = time.monotonic()
    small_n, large_n, dead_n = (4_000, 20_000, 2_000) if args.smoke else (
        10_000, 1_000_000, 100_000)
    shapes = {"small": (Shape("web_small", small_n, 100), {}),
              "large": (Shape("web_large", large_n, 1_000), {}),
              "dead": (Shape("web_dead", 10_000, 100), {"dead": dead_n})}
    engines, sizes = {}, {}
    now = utcnow()
    for key, (shape, extra) in shapes.items():
        t0 = time.monotonic()
        print(f"web: building {shape.name} …", end="", flush=True)
        engines[key] = scratch.database(shape.name)
        build(engines[key], shape, now, extra=extra, retries=RETRIES)
        counted = _roll_up(engines[key])
        with engines[key].connect() as conn:
            sizes[key] = {t: conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar()
                          for t in ("outbox_messages", "outbox_attempts")}
            sizes[key]["dead"] = conn.exec_driver_sql(
                "SELECT count(*) FROM outbox_messages WHERE status = 'dead'").scalar()
        print(f" {sizes[key]['outbox_messages']:,} messages, "
              f"{sizes[key]['outbox_attempts']:,} attempts ({counted:,} rolled up), "
              f"{time.monotonic() - t0:.1f} s", flush=True)

    clients = {key: _client(engine) for key, engine in engines.items()}
    results: dict[str, Any] = {"config": {"runs": args.runs, "sizes": sizes,
                                          "smoke": args.smoke}}
    rows = []
    for label, path in (("(a) /metrics scrape", "/metrics"), ("(b) /health", "/health")):
        small, large = _timer(clients["small"], path), _timer(clients["large"], path)
        small(), large()
        t_small, t_large = [], []
        for _ in range(args.runs):
            t_small.append(small())
            t_large.append(large())
        p99 = _p(t_large, 0.99)
        met = p99 <= TARGET_SCRAPE_MS
        rows.append(f"{label:<40}{_p(t_small, .5):>8.1f} /{_p(t_small, .99):>7.1f} ms"
                    f"{_p(t_large, .5):>12.1f} /{p99:>7.1f} ms   p99 target ≤ "
                    f"{TARGET_SCRAPE_MS:g} ms: {'met' if met else 'MISSED'}")
        results[path] = {"small_p50_ms": _p(t_small, .5), "small_p99_ms": _p(t_small, .99),
                         "large_p50_ms": _p(t_large, .5), "large_p99_ms": p99, "met": met}
    path = "/dead-letters?provider=payments&error_class=client_error"
    page = _timer(clients["dead"], path)
    page()
    t_page = [page() for _ in range(args.runs)]
    p99 = _p(t_page, 0.99)
    met = p99 <= TARGET_DEAD_PAGE_MS
    rows.append(f"{'(c) dead letters, filtered, first page':<40}{'':>20}"
                f"{_p(t_page, .5):>12.1f} /{p99:>7.1f} ms   p99 target ≤ "
                f"{TARGET_DEAD_PAGE_MS:g} ms: {'met' if met else 'MISSED'}")
    results["dead_page"] = {"p50_ms": _p(t_page, .5), "p99_ms": p99, "met": met,
                            "path": path}
    for client in clients.values():
        client.close()
    results["elapsed_s"] = round(time.monotonic() - started, 1)

    s, lg, d = sizes["small"], sizes["large"], sizes["dead"]
    print()
    print(f"web (PostgreSQL, {args.runs} calls per side, p50 / p99"
          f"{'; smoke mode: figures say little' if args.smoke else ''})")
    print(f"{'':<40}{_short(s['outbox_messages'])} msgs, {_short(s['outbox_attempts'])} att."
          f"{'':>4}{_short(lg['outbox_messages'])} msgs, {_short(lg['outbox_attempts'])} att."
          f"   ({_short(d['dead'])} dead letters for (c))")
    for row in rows:
        print(row)
    all_met = all(r["met"] for r in (results["/metrics"], results["/health"],
                                     results["dead_page"]))
    print(f"{'all targets met' if all_met else 'some targets MISSED'}; "
          f"{results['elapsed_s']:.0f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {RESULTS.relative_to(ROOT)}")
    return 0


def _short(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    if n >= 1000:
        return f"{n / 1000:.0f}k"
    return str(n)

