"""``python -m bench ratelimit``: integration-outbox's global limiter vs Celery's ``rate_limit``.

Issue 3's benchmark, side by side in one run against one sandbox that enforces the
provider's limit itself (``limit`` requests in any sliding ``1 s`` window, 429 with
``Retry-After`` beyond it):

* **ours**: ``W`` worker processes ``celery -A tasks worker -Q payments -P threads -c C``
  with ``OUTBOX_PAYMENTS_RATE_LIMIT=<limit>/s`` (GCRA shared in Redis, default 2 % margin)
  and the relay; ``N`` ``payments.charge`` messages enqueued in transactions of 100 into a
  scratch database. Waits until all are delivered (bounded by ``--ours-timeout``).
* **celery**: the same ``W`` × ``-P threads -c C`` workers running a bare task with
  ``rate_limit="<limit>/s"`` (``bench.ratelimit_celery``) that makes the same POST; ``N``
  tasks published. Bounded by ``--celery-seconds``: it is not expected to finish (see
  ../shared/FINDINGS.md), and what it reached in that time is reported.

The sandbox's request log is the witness (arrival time ``t`` of every request, per key).
For each side, over the requests to ``/v1/payment_intents`` carrying that side's keys:

* highest count in any 1 s window: max over windows ``[t, t + 1 s)`` (sliding; the best
  window can always be slid to start at an arrival, so checking those is exhaustive);
* windows over the limit: arrivals ``t`` whose window ``[t, t + 1 s)`` holds more than
  ``limit`` requests (0 means no 1-second window anywhere exceeded the limit); also, for
  reference, whole clock seconds ``[k, k + 1)`` holding more than ``limit``;
* mean rate = requests accepted (2xx) / (last arrival − first arrival);
  utilisation = mean rate / limit; rate over the run = accepted / elapsed;
* 429s received; deliveries completed; elapsed (first enqueue/publish → last delivery, or
  the time budget when it did not finish).

Target for ours: 0 windows over the limit, utilisation ≥ 95 %, every message delivered.
Loopback only; every process runs in its own process group and is killed in ``finally``.
Results go to ``var/bench-ratelimit.json``; process logs to ``var/bench-logs/ratelimit/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections import Counter

from sandbox.stats import max_in_window, windows_over

from .stack import BIN, ROOT, BenchError, Stack, run_guarded, wait_until

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
RESULTS = ROOT / "var" / "bench-ratelimit.json"
LOG_DIR = ROOT / "var" / "bench-logs" / "ratelimit"
PATH = "/v1/payment_intents"
WINDOW_S = 1.0
TARGET_UTILISATION = 0.95
BATCH = 100
POLL_S = 0.5


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench ratelimit", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="messages per side (default %(default)s)")
    p.add_argument("--limit", type=int, default=50, help="requests per second (default %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="worker processes per side")
    p.add_argument("--concurrency", type=int, default=4, help="threads per worker (-c)")
    p.add_argument("--ours-timeout", type=float, default=90.0,
                   help="give up waiting for ours after this many seconds (default %(default)s)")
    p.add_argument("--celery-seconds", type=float, default=60.0,
                   help="time budget of Celery's side (default %(default)s)")
    p.add_argument("--warmup", type=int, default=32, help="warm-up messages per side (not measured)")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_RATELIMIT_REDIS_URL",
                                                         DEFAULT_REDIS_URL),
                   help="a Redis DB the bench may flush (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="small counts, to check the harness")
    p.add_argument("--smoke", action="store_true",
                   help="tiny counts, seconds: only proves the benchmark still runs (make test)")
    p.add_argument("--max-seconds", type=int, default=300, help="hard stop for the whole run")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.ours_timeout, args.celery_seconds, args.warmup = 300, 30.0, 15.0, 16
    if args.smoke:
        args.n, args.workers, args.ours_timeout, args.celery_seconds = 40, 1, 20.0, 3.0
        args.warmup, args.max_seconds = 4, 120
    if args.n < 2 or args.limit < 1 or args.workers < 1 or args.concurrency < 1:
        p.error("--n must be >= 2; --limit, --workers and --concurrency >= 1")
    return args


# ---- window arithmetic (pure; sliding windows: sandbox.stats) --------------------------

def aligned_seconds_over(times: list[float], limit: int) -> int:
    """Whole clock seconds ``[k, k + 1)`` holding more than ``limit`` arrivals."""
    return sum(1 for count in Counter(math.floor(t) for t in times).values() if count > limit)


def summarize(side: str, stats: dict, key_prefix: str, limit: int, n: int, *, t0: float,
              t_end: float, completed: int, finished: bool, extra: dict | None = None) -> dict:
    """The figures of one side from the sandbox's request log."""
    entries = [e for e in stats["request_log"]
               if e["path"] == PATH and str(e.get("key") or "").startswith(key_prefix)]
    arrivals = sorted(e["t"] for e in entries)
    accepted = [e for e in entries if isinstance(e["status"], int) and 200 <= e["status"] < 300]
    statuses = Counter(str(e["status"]) for e in entries)
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    elapsed = max(t_end - t0, 1e-9)
    mean_rate = len(accepted) / span if span > 0 else 0.0
    duplicated = sum(1 for c in Counter(e["key"] for e in accepted).values() if c > 1)
    out = {
        "side": side, "n": n, "limit_per_s": limit,
        "completed": completed, "finished": finished,
        "elapsed_s": round(elapsed, 3),
        "requests_sent": len(entries), "requests_accepted": len(accepted),
        "max_in_1s_window": max_in_window(arrivals, WINDOW_S),
        "max_in_1s_window_accepted": max_in_window(sorted(e["t"] for e in accepted), WINDOW_S),
        "windows_over_limit_sliding": windows_over(arrivals, limit, WINDOW_S),
        "seconds_over_limit_aligned": aligned_seconds_over(arrivals, limit),
        "first_to_last_arrival_s": round(span, 3),
        "mean_rate_per_s": round(mean_rate, 2),
        "utilisation": round(mean_rate / limit, 4),
        "rate_over_run_per_s": round(len(accepted) / elapsed, 2),
        "utilisation_over_run": round(len(accepted) / elapsed / limit, 4),
        "first_arrival_after_start_s": round(arrivals[0] - t0, 3) if arrivals else None,
        "http_429": statuses.get("429", 0),
        "statuses": dict(statuses),
        "sandbox_status_counts": stats.get("status_counts", {}),
        "duplicate_effects": duplicated,
        # requests arriving in each second since the start (whole seconds after t0)
        "per_second": [c for _, c in sorted(Counter(int(t - t0) for t in arrivals).items())],
        # every request: (arrival after t0 in s, status), for offline analysis of windows
        "arrivals": [(round(e["t"] - t0, 5), e["status"]) for e in sorted(entries,
                                                                         key=lambda e: e["t"])],
    }
    if extra:
        out.update(extra)
    return out


# ---- processes -----------------------------------------------------------------------

def _sandbox_limit(stack: Stack, limit: int) -> None:
    """Reset the sandbox (which also clears its limit) and apply ``limit`` per 1 s again."""
    stack.sandbox_reset()
    stack.http.post(stack.sandbox_url + "/_sandbox/config", timeout=10,
                    json={"rate_limit": {"limit": limit, "window_s": WINDOW_S}}).raise_for_status()


def _start_workers(stack: Stack, prefix: str, app: str, args: argparse.Namespace,
                   env: dict[str, str]) -> list[str]:
    """``args.workers`` workers of ``app`` (``-c`` is the stack's ``args.concurrency``), all
    started before waiting for any."""
    names = [f"{prefix}{i}" for i in range(args.workers)]
    for name in names:
        stack.spawn_worker(name, app=app, **env)
    for name in names:
        stack.wait_ready(name)
    return names


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


# ---- ours ------------------------------------------------------------------------------

def _enqueue(sessions, prefix: str, count: int) -> None:
    from outbox import enqueue

    for start in range(0, count, BATCH):
        with sessions() as s:
            for i in range(start, min(count, start + BATCH)):
                enqueue(s, provider="payments", operation="charge",
                        payload={"amount": 100 + i % 10_000, "currency": "usd"},
                        idempotency_key=f"{prefix}{i}")
            s.commit()


def _counts(sessions, prefix: str) -> Counter:
    from sqlalchemy import func, select

    from outbox import Message

    with sessions() as s:
        rows = s.execute(select(Message.status, func.count())
                         .where(Message.idempotency_key.like(prefix + "%"))
                         .group_by(Message.status)).all()
    return Counter({getattr(status, "value", str(status)): count for status, count in rows})


def _last_delivered_at(sessions, prefix: str) -> float | None:
    from datetime import UTC, datetime

    from sqlalchemy import func, select

    from outbox import Message

    with sessions() as s:
        last = s.scalar(select(func.max(Message.delivered_at))
                        .where(Message.idempotency_key.like(prefix + "%")))
    if last is None:
        return None
    if isinstance(last, str):
        last = datetime.fromisoformat(last)
    return last.replace(tzinfo=UTC).timestamp() if last.tzinfo is None else last.timestamp()


def run_ours(stack: Stack, sessions, args: argparse.Namespace) -> dict:
    spec = f"{args.limit}/s"
    # No concurrency cap (blank = unset): only the rate limit is under test.
    env = {"OUTBOX_PAYMENTS_RATE_LIMIT": spec, "OUTBOX_PAYMENTS_MAX_CONCURRENCY": ""}
    _sandbox_limit(stack, args.limit)
    print(f"ratelimit: ours — starting {args.workers} workers (-P threads -c {args.concurrency}, "
          f"OUTBOX_PAYMENTS_RATE_LIMIT={spec}) and the relay …", flush=True)
    names = _start_workers(stack, "ours-worker-", "tasks", args, env)
    stack._start("ours-relay", [str(BIN / "outbox"), "relay"], **env)
    names.append("ours-relay")
    try:
        if args.warmup:
            _enqueue(sessions, "rl-warm-ours-", args.warmup)
            wait_until(lambda: _counts(sessions, "rl-warm-ours-")["delivered"] >= args.warmup,
                       30, POLL_S, what="ours: warm-up deliveries")
        _sandbox_limit(stack, args.limit)
        prefix = "rl-ours-"
        print(f"ratelimit: ours — {args.n} messages (transactions of {BATCH}), "
              f"bounded at {args.ours_timeout:g} s …", flush=True)
        t0 = time.time()
        _enqueue(sessions, prefix, args.n)
        t_submitted = time.time()
        deadline = t0 + args.ours_timeout
        counts = Counter()
        while time.time() < deadline:
            stack.check_alive()
            counts = _counts(sessions, prefix)
            if counts["delivered"] + counts["dead"] >= args.n:
                break
            time.sleep(POLL_S)
        counts = _counts(sessions, prefix)
        finished = counts["delivered"] >= args.n
        t_end = (_last_delivered_at(sessions, prefix) or time.time()) if finished else deadline
        time.sleep(0.2)   # the last responses' end times
        stats = stack.sandbox_stats(log=True)
    finally:
        stack.stop_all(names)
    return summarize("ours", stats, prefix, args.limit, args.n, t0=t0, t_end=t_end,
                     completed=counts["delivered"], finished=finished,
                     extra={"submit_s": round(t_submitted - t0, 3),
                            "row_statuses": dict(counts), "time_budget_s": args.ours_timeout,
                            "rate_margin": os.environ.get("OUTBOX_PAYMENTS_RATE_MARGIN")
                            or "default (2 %)"})


# ---- Celery's rate_limit -----------------------------------------------------------------

def _answered(stack: Stack, prefix: str) -> int:
    log = stack.sandbox_stats(log=True)["request_log"]
    return sum(1 for e in log if e["status"] is not None and str(e["key"]).startswith(prefix))


def run_celery(stack: Stack, args: argparse.Namespace) -> dict:
    spec = f"{args.limit}/s"
    env = {"BENCH_CELERY_RATE_LIMIT": spec, "BENCH_CELERY_POOL": str(args.concurrency)}
    os.environ.update(env)   # before the import: the task's rate_limit is read there
    from . import ratelimit_celery

    _sandbox_limit(stack, args.limit)
    print(f"ratelimit: celery — starting {args.workers} workers (-P threads -c "
          f"{args.concurrency}, task rate_limit=\"{ratelimit_celery.RATE}\") …", flush=True)
    names = _start_workers(stack, "celery-worker-", "bench.ratelimit_celery", args, env)
    try:
        if args.warmup:
            warm = min(args.warmup, 8)
            ratelimit_celery.publish_many([(f"rl-warm-celery-{i}", 100 + i) for i in range(warm)])
            try:
                wait_until(lambda: _answered(stack, "rl-warm-celery-") >= warm, 15, POLL_S,
                           what="celery: warm-up tasks")
            except BenchError as exc:   # slow by nature; keys keep leftovers out of the figures
                print(f"ratelimit: celery — {exc}; going on", flush=True)
        _sandbox_limit(stack, args.limit)
        prefix = "rl-celery-"
        print(f"ratelimit: celery — {args.n} tasks, time budget {args.celery_seconds:g} s …",
              flush=True)
        t0 = time.time()
        ratelimit_celery.publish_many([(f"{prefix}{i}", 100 + i % 10_000)
                                       for i in range(args.n)])
        t_submitted = time.time()
        deadline = t0 + args.celery_seconds
        answered = 0
        while time.time() < deadline:
            stack.check_alive()
            answered = _answered(stack, prefix)
            if answered >= args.n:
                break
            time.sleep(POLL_S)
        finished = answered >= args.n
        stats = stack.sandbox_stats(log=True)
        mine = [e for e in stats["request_log"] if str(e["key"]).startswith(prefix)]
        t_end = (max(e["t_end"] or e["t"] for e in mine) if finished else
                 min(time.time(), deadline))
    finally:
        stack.stop_all(names)
    completed = sum(1 for e in mine if isinstance(e["status"], int) and 200 <= e["status"] < 300)
    return summarize("celery", stats, prefix, args.limit, args.n, t0=t0, t_end=t_end,
                     completed=completed, finished=finished,
                     extra={"submit_s": round(t_submitted - t0, 3),
                            "time_budget_s": args.celery_seconds,
                            "tasks_failed": len(mine) - completed,
                            "tasks_not_run": args.n - len(mine)})


# ---- report ------------------------------------------------------------------------------

def target_met(ours: dict) -> bool:
    return (ours["windows_over_limit_sliding"] == 0 and ours["finished"]
            and ours["utilisation"] >= TARGET_UTILISATION)


def render(results: dict) -> str:
    cfg, ours, cel = results["config"], results["ours"], results.get("celery")
    limit = cfg["limit_per_s"]

    def done(r: dict) -> str:
        text = f"{r['completed']}/{r['n']}"
        return text if r["finished"] else f"{text} (stopped at {r['time_budget_s']:g} s)"

    rows = [
        ("deliveries completed", done),
        ("elapsed", lambda r: f"{r['elapsed_s']:.1f} s"),
        ("requests sent / accepted (2xx)",
         lambda r: f"{r['requests_sent']} / {r['requests_accepted']}"),
        ("highest count in any 1 s window", lambda r: str(r["max_in_1s_window"])),
        (f"windows over {limit} (sliding)¹", lambda r: str(r["windows_over_limit_sliding"])),
        (f"clock seconds over {limit}²", lambda r: str(r["seconds_over_limit_aligned"])),
        ("mean rate³", lambda r: f"{r['mean_rate_per_s']:.2f}/s"),
        ("utilisation of the limit", lambda r: f"{r['utilisation'] * 100:.1f} %"),
        ("rate over the whole run⁴", lambda r: f"{r['rate_over_run_per_s']:.2f}/s "
                                              f"({r['utilisation_over_run'] * 100:.1f} %)"),
        ("429s received", lambda r: str(r["http_429"])),
    ]
    head = ("integration-outbox", f'Celery rate_limit="{limit}/s"')
    width = max(len(label) for label, _ in rows) + 2
    lines = [
        f"Rate limit {limit}/s enforced by the sandbox (sliding 1 s window, 429 + Retry-After); "
        f"{cfg['workers']} worker processes × -P threads -c {cfg['concurrency']} per side; "
        f"{cfg['n']} messages; {cfg['database']}; Redis {cfg['redis_url']}",
        "",
        f"{'':<{width}}{head[0]:<24}{head[1]}",
    ]
    for label, fmt in rows:
        lines.append(f"{label:<{width}}{fmt(ours):<24}{fmt(cel) if cel else '—'}")
    verdict = "target met" if target_met(ours) else "MISSED"
    lines.append(f"{'target (0 over, ≥ 95 %)':<{width}}{verdict:<24}—")
    lines += [
        "",
        f"¹ arrivals t whose window [t, t+1 s) holds more than {limit} requests (all requests "
        "sent, 429s included; 0 = no 1 s window anywhere over the limit)",
        f"² whole clock seconds [k, k+1) with more than {limit} requests (for reference)",
        "³ requests accepted / (last arrival − first arrival); utilisation = mean rate / limit",
        "⁴ requests accepted / elapsed (first enqueue or publish → last delivery, or the time "
        "budget when the side did not finish)",
    ]
    if not target_met(ours):
        why = []
        if ours["windows_over_limit_sliding"]:
            why.append(f"{ours['windows_over_limit_sliding']} window(s) over the limit")
        if ours["utilisation"] < TARGET_UTILISATION:
            why.append(f"utilisation {ours['utilisation'] * 100:.1f} % < 95 % "
                       f"(margin {ours['rate_margin']})")
        if not ours["finished"]:
            why.append(f"only {ours['completed']}/{ours['n']} delivered in "
                       f"{ours['time_budget_s']:g} s")
        lines.append("ours MISSED the target: " + "; ".join(why))
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    stack = Stack(args.redis_url, args.concurrency, LOG_DIR)

    def body() -> int:
        started = time.monotonic()
        print(f"ratelimit: starting sandbox (limit {args.limit}/s), scratch database and Redis "
              f"db {args.redis_url.rsplit('/', 1)[-1]} …", flush=True)
        stack.check_redis()   # flushes the DB
        stack.start_sandbox()
        stack.make_database()
        os.environ.update(stack.env())   # before anything imports tasks (celeryconfig)
        from outbox.db import make_sessionmaker

        sessions = make_sessionmaker(stack.open_engine())   # disposed by stack.close()
        results: dict = {"config": {
            "limit_per_s": args.limit, "window_s": WINDOW_S, "n": args.n,
            "workers": args.workers, "concurrency": args.concurrency,
            "worker": f"{args.workers} processes, -P threads -c {args.concurrency}, "
                      "celeryconfig settings",
            "database": stack.db_kind, "redis_url": args.redis_url,
            "ours_timeout_s": args.ours_timeout, "celery_seconds": args.celery_seconds,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        }}
        results["ours"] = run_ours(stack, sessions, args)
        _flush_redis(args.redis_url)   # nothing of ours left in the queue or the limiter
        results["celery"] = run_celery(stack, args)
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        results["config"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results["target_met"] = target_met(results["ours"])
        print()
        print(render(results))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults: {RESULTS.relative_to(ROOT)}   process logs: "
              f"{LOG_DIR.relative_to(ROOT)}/   ({results['elapsed_s']:.0f} s)")
        return 0

    try:
        return run_guarded("ratelimit", stack, args.max_seconds, body)
    finally:
        try:
            _flush_redis(args.redis_url)
        except Exception:
            pass


if __name__ == "__main__":
    raise SystemExit(main())
