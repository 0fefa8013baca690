"""``python -m bench scaleout``: does throughput rise with worker processes until the cores are full?

Issue 7 §3. The real system on PostgreSQL (a scratch database on ``BENCH_SCALEOUT_DATABASE_URL``,
else ``BENCH_DATABASE_URL``, else ``postgresql://postgres@127.0.0.1:5432/test``; SQLite's single
writer would be the bottleneck): the sandbox provider in its own process, ``outbox relay`` with
its default settings, and N Celery worker processes as the Procfile runs them
(``celery -A tasks worker -Q payments -P threads -c 8``), for N = 1, 2, 3, 4, on a Redis
database of its own (``--redis-url``, default ``redis://127.0.0.1:6379/5``, flushed).

For each N and each provider latency — (a) the sandbox's default (sub-millisecond) and (b)
``--slow-provider-ms`` (50 ms, the sandbox's ``latency`` fault) — the bench process enqueues
``--n`` charges through ``outbox.enqueue`` (transactions of 100; after-commit dispatch, the
relay takes what is over its ``max_queued``), and measures:

* **deliveries/s**: ``n`` ÷ (last response − first request at the sandbox), from the
  sandbox's request log; also ``n`` ÷ (start of enqueue → last response);
* **CPU per delivery** (ms) of the workers (all N, ``bench.stack.cpu_seconds``), the relay,
  the PostgreSQL backends serving the scratch database, the sandbox and the bench process;
* **cores busy**: those processes' CPU ÷ wall time, and the whole machine's (``/proc/stat``,
  others' processes included) over the same window;
* how often the broker queue was empty while work remained (workers starved for messages).

Every delivery is checked: exactly one effect per key at the sandbox, every row delivered,
no dead letter. Workers are added and removed one at a time (N = 1, 2, 3, 4, 4, 3, 2, 1,
1, 2, …, ``--repeat`` visits of each N), so drift in the machine's load falls on every N
alike; each point is the median of its visits. The global in-flight cap
(``OUTBOX_PAYMENTS_MAX_CONCURRENCY``) is set to the largest N × 8, so that it never binds.

``--smoke``: N = 1, 2, 100 messages, one visit — proves it runs, in well under a minute.
``--max-seconds`` stops the whole run (exit 3). Results go to ``var/bench-scaleout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from .stack import ROOT, BenchError, Stack, cpu_seconds, run_guarded, wait_until

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/5"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
RESULTS = ROOT / "var" / "bench-scaleout.json"
THREADS = 8
BATCH = 100
POLL_S = 0.1
PAYMENTS_PATH = "/v1/payment_intents"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench scaleout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="messages per measurement")
    p.add_argument("--workers", default="1,2,3,4", help="worker process counts (ascending)")
    p.add_argument("--repeat", type=int, default=3, help="visits of each point (median)")
    p.add_argument("--concurrency", type=int, default=THREADS, help="threads per worker (-c)")
    p.add_argument("--slow-provider-ms", type=float, default=50.0,
                   help="the second provider latency (0: only the default)")
    p.add_argument("--max-queued", type=int, default=None,
                   help="OUTBOX_RELAY_MAX_QUEUED for the relay and dispatch (default: theirs)")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_SCALEOUT_REDIS_URL",
                                                         DEFAULT_REDIS_URL),
                   help="a Redis DB the bench may flush (default %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help="N = 1, 2, 100 messages, one visit: proves it runs (seconds)")
    p.add_argument("--max-seconds", type=int, default=2400, help="hard stop for the whole run")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.workers, args.repeat, args.max_seconds = 100, "1,2", 1, 60
    args.ns = sorted({int(x) for x in args.workers.split(",") if x.strip()})
    if not args.ns or args.ns[0] < 1:
        p.error("--workers: positive integers, e.g. 1,2,3,4")
    return args


# ---- CPU accounting -----------------------------------------------------------------------

def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    total = sum(fields[:8])                                      # guest is inside user
    return (total - idle) / tick, total / tick


class Cpu:
    """CPU seconds of the system's processes, read at the start and end of a measurement."""

    def __init__(self, stack: Stack, engine, db_name: str):
        self.stack, self.engine, self.db_name = stack, engine, db_name

    def _pg_backends(self) -> dict[int, float]:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            pids = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :d"),
                                {"d": self.db_name}).scalars().all()
        return {pid: cpu_seconds(pid) for pid in pids}

    def snapshot(self) -> dict:
        times = os.times()
        procs = {name: cpu_seconds(p.pid) for name, p in self.stack.procs.items()}
        busy, total = _machine_cpu()
        return {"t": time.monotonic(), "bench": times.user + times.system, "procs": procs,
                "pg": self._pg_backends(), "machine_busy": busy, "machine_total": total}

    @staticmethod
    def delta(a: dict, b: dict) -> dict[str, float]:
        """CPU seconds per role between snapshots ``a`` and ``b``."""
        def procs(prefix: str) -> float:
            return sum(b["procs"][k] - a["procs"].get(k, b["procs"][k])
                       for k in b["procs"] if k.startswith(prefix))
        # a backend that appeared during the window: its whole life is inside it
        pg = sum(v - a["pg"].get(pid, 0.0) for pid, v in b["pg"].items()
                 if v == v and a["pg"].get(pid, 0.0) == a["pg"].get(pid, 0.0))  # not NaN
        return {"workers": procs("worker"), "relay": procs("relay"), "sandbox": procs("sandbox"),
                "postgres": pg, "bench": b["bench"] - a["bench"],
                "machine": b["machine_busy"] - a["machine_busy"], "wall": b["t"] - a["t"]}


# ---- one measurement ------------------------------------------------------------------------

class Runner:
    def __init__(self, stack: Stack, args: argparse.Namespace):
        from outbox.db import make_sessionmaker

        self.stack, self.args = stack, args
        self.engine = stack.open_engine()
        self.sessions = make_sessionmaker(self.engine)
        self.cpu = Cpu(stack, self.engine, self.engine.url.database)
        self.redis = __import__("redis").Redis.from_url(stack.redis_url)
        self.workers: list[str] = []

    # --- workers ---

    def scale_to(self, n: int) -> None:
        """Add or remove worker processes (one at a time) until ``n`` run."""
        added = []
        while len(self.workers) < n:
            name = f"worker{len(self.workers) + 1}"
            self.stack.spawn_worker(
                name, node=f"scaleout-{name}@%h",
                OUTBOX_PAYMENTS_MAX_CONCURRENCY=str(max(self.args.ns) * self.args.concurrency))
            self.workers.append(name)
            added.append(name)
        for name in added:
            self.stack.wait_ready(name)
        if len(self.workers) > n:
            self.stack.stop_all(self.workers[n:])
            del self.workers[n:]
        if added:   # connections, pools and imports of the new processes, before any timing
            self.deliver(f"warm-{len(self.workers)}-{time.monotonic_ns()}-",
                         4 * self.args.concurrency * len(self.workers), 0.0, timed=False)

    # --- the database ---

    def _working(self) -> tuple[int, int]:
        """(pending + queued + in flight, dead) payments rows."""
        from sqlalchemy import func, select

        from outbox import Message, MessageStatus

        working = (MessageStatus.PENDING, MessageStatus.QUEUED, MessageStatus.IN_FLIGHT)
        with self.sessions() as s:
            rows = dict(s.execute(
                select(Message.status, func.count())
                .where(Message.provider == "payments",
                       Message.status.in_([*working, MessageStatus.DEAD]))
                .group_by(Message.status)).all())
        return sum(rows.get(w, 0) for w in working), rows.get(MessageStatus.DEAD, 0)

    def _delivered(self, prefix: str) -> int:
        from sqlalchemy import func, select

        from outbox import Message, MessageStatus

        with self.sessions() as s:
            return s.scalar(select(func.count()).where(
                Message.idempotency_key.like(prefix + "%"),
                Message.status == MessageStatus.DELIVERED))

    # --- a run ---

    def deliver(self, prefix: str, n: int, latency_s: float, timed: bool = True) -> dict | None:
        """Enqueue ``n`` charges, wait until all are delivered; the figures if ``timed``."""
        from outbox import enqueue

        stack = self.stack
        stack.sandbox_reset()
        if latency_s:
            stack.sandbox_latency(latency_s)
        dead0 = self._working()[1]
        cpu0 = self.cpu.snapshot()
        t0 = time.time()
        for start in range(0, n, BATCH):
            with self.sessions() as s:
                for i in range(start, min(n, start + BATCH)):
                    enqueue(s, provider="payments", operation="charge",
                            payload={"amount": 100 + i % 10_000, "currency": "usd"},
                            idempotency_key=f"{prefix}{i}")
                s.commit()
        t_enqueued = time.time()
        samples = {"polls": 0, "empty": 0}
        timeout_s = max(60.0, n / 10)

        def done() -> bool:
            stack.check_alive()
            working, dead = self._working()
            if dead > dead0:
                raise BenchError(f"{dead - dead0} message(s) dead-lettered; see "
                                 f"{stack.log_dir}/worker*.log")
            if working:
                samples["polls"] += 1
                samples["empty"] += self.redis.llen("payments") == 0
            return working == 0
        wait_until(done, timeout_s, POLL_S, what=f"{n} deliveries ({prefix}*)")
        cpu1 = self.cpu.snapshot()
        if not timed:
            return None
        stats = stack.sandbox_stats(log=True)
        log = [e for e in stats["request_log"]
               if e["path"].startswith(PAYMENTS_PATH) and e["key"].startswith(prefix)]
        effects = {k: c for k, c in stats["effects_by_key"].items() if k.startswith(prefix)}
        duplicated = sum(1 for c in effects.values() if c > 1)
        delivered = self._delivered(prefix)
        if len(effects) != n or duplicated or delivered != n or len(log) < n:
            raise BenchError(f"{prefix}: {len(effects)} keys with an effect for {n} messages, "
                             f"{duplicated} duplicated, {delivered} rows delivered, "
                             f"{len(log)} requests logged")
        first = min(e["t"] for e in log)
        last = max(e["t_end"] or e["t"] for e in log)
        cpu = Cpu.delta(cpu0, cpu1)
        return {
            "n": n, "latency_ms": latency_s * 1000, "workers": len(self.workers),
            "per_s": n / (last - first), "e2e_per_s": n / (last - t0),
            "enqueue_s": t_enqueued - t0, "span_s": last - first,
            "requests": len(log), "max_in_flight": stats["max_in_flight"],
            "cpu_s": cpu,
            "cpu_ms_per_delivery": {k: v * 1000 / n for k, v in cpu.items()
                                    if k not in ("wall", "machine")},
            "cores_ours": sum(v for k, v in cpu.items() if k not in ("wall", "machine"))
            / cpu["wall"],
            "cores_machine": cpu["machine"] / cpu["wall"],
            "queue_empty": samples["empty"] / samples["polls"] if samples["polls"] else 0.0,
        }


# ---- the report ----------------------------------------------------------------------------

def _median(runs: list[dict], key) -> float:
    return statistics.median(key(r) for r in runs)


def summarize(runs: list[dict], latencies: list[float], ns: list[int]) -> list[dict]:
    points = []
    for latency in latencies:
        base = None
        for n in ns:
            rs = [r for r in runs if r["latency_ms"] == latency and r["workers"] == n]
            if not rs:
                continue
            per_s = _median(rs, lambda r: r["per_s"])
            base = per_s if base is None and n == ns[0] else base
            points.append({
                "latency_ms": latency, "workers": n, "per_s": round(per_s, 1),
                "runs_per_s": [round(r["per_s"], 1) for r in rs],
                "ratio": round(per_s / base, 2) if base else None,
                "e2e_per_s": round(_median(rs, lambda r: r["e2e_per_s"]), 1),
                "cpu_ms_per_delivery": {
                    k: round(_median(rs, lambda r, k=k: r["cpu_ms_per_delivery"][k]), 2)
                    for k in rs[0]["cpu_ms_per_delivery"]},
                "cores_ours": round(_median(rs, lambda r: r["cores_ours"]), 2),
                "cores_machine": round(_median(rs, lambda r: r["cores_machine"]), 2),
                "queue_empty": round(_median(rs, lambda r: r["queue_empty"]), 2),
            })
    return points


def render(results: dict) -> str:
    c = results["config"]
    lines = [
        f"Scale-out (issue 7 §3): N worker processes (celery -P threads -c {c['concurrency']}), "
        f"PostgreSQL, real relay (max_queued {c['relay_max_queued']}), sandbox in its own "
        "process",
        f"cores (os.cpu_count()): {c['cpus']}    load average at start: {c['load_start']}    "
        f"at end: {results.get('load_end', '?')}",
        f"{c['n']} messages per run, median of {c['repeat']} run(s) per point "
        f"(order: {' '.join(map(str, c['order']))})",
        "",
        "deliveries/s: first request → last response at the sandbox; e2e/s: start of enqueue → "
        "last response.",
        "CPU ms per delivery: workers (all N) | relay | PostgreSQL backends | sandbox | bench "
        "(enqueue).",
        "cores busy: these processes' CPU ÷ wall time | the whole machine's (others included). "
        "q empty: share of polls with the broker queue empty while work remained.",
    ]
    head = (f"{'latency':>8} {'N':>2} {'deliv/s':>8} {'×N=1':>5} {'e2e/s':>7}  "
            f"{'worker':>6} {'relay':>5} {'pg':>5} {'sandbx':>6} {'bench':>5}  "
            f"{'ours':>5} {'machine':>7} {'q empty':>7}  runs (/s)")
    for latency in c["latencies_ms"]:
        lines += ["", head, "-" * len(head)]
        for p in (p for p in results["points"] if p["latency_ms"] == latency):
            ms = p["cpu_ms_per_delivery"]
            label = "default" if latency == 0 else f"{latency:g} ms"
            lines.append(
                f"{label:>8} {p['workers']:>2} {p['per_s']:>8.1f} {p['ratio']:>5.2f} "
                f"{p['e2e_per_s']:>7.1f}  {ms['workers']:>6.2f} {ms['relay']:>5.2f} "
                f"{ms['postgres']:>5.2f} {ms['sandbox']:>6.2f} {ms['bench']:>5.2f}  "
                f"{p['cores_ours']:>5.2f} {p['cores_machine']:>7.2f} "
                f"{p['queue_empty'] * 100:>6.0f}%  {', '.join(map(str, p['runs_per_s']))}")
    return "\n".join(lines)


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    stack = Stack(args.redis_url, args.concurrency, ROOT / "var" / "bench-scaleout-logs")
    os.environ["BENCH_DATABASE_URL"] = (os.environ.get("BENCH_SCALEOUT_DATABASE_URL")
                                        or os.environ.get("BENCH_DATABASE_URL") or DEFAULT_PG_URL)
    os.environ.pop("CELERY_BROKER_URL", None)        # the broker is --redis-url
    if args.max_queued is not None:
        os.environ["OUTBOX_RELAY_MAX_QUEUED"] = str(args.max_queued)
    latencies = [0.0] + ([args.slow_provider_ms] if args.slow_provider_ms > 0 else [])

    # N = 1, 2, 3, 4, 4, 3, 2, 1, 1, 2, …: one worker added or removed between points
    order: list[int] = []
    for visit in range(args.repeat):
        order += args.ns if visit % 2 == 0 else args.ns[::-1]

    def body() -> int:
        started = time.monotonic()
        load_start = _loadavg()
        print(f"bench scaleout: {os.cpu_count()} cores, load average {load_start}; starting "
              f"sandbox, PostgreSQL scratch database, relay (Redis db "
              f"{args.redis_url.rsplit('/', 1)[-1]}) …", flush=True)
        stack.check_redis()
        stack.start_sandbox()
        stack.make_database()
        if stack.db_kind != "postgresql":
            raise BenchError("needs PostgreSQL (BENCH_SCALEOUT_DATABASE_URL)")
        # Before anything imports ``tasks``: celeryconfig reads REDIS_URL at import time.
        os.environ.update(stack.env())
        from outbox.config import RelaySettings

        runner = Runner(stack, args)
        stack.start_relay()
        runs: list[dict] = []
        for step, n_workers in enumerate(order):
            runner.scale_to(n_workers)
            for latency_ms in latencies:
                tag = "default" if latency_ms == 0 else f"{latency_ms:g} ms"
                result = runner.deliver(f"so-{step}-{n_workers}-{latency_ms:g}-", args.n,
                                        latency_ms / 1000)
                runs.append(result)
                print(f"  N={n_workers} provider {tag:>7}: {result['per_s']:7.1f} deliveries/s, "
                      f"worker CPU {result['cpu_ms_per_delivery']['workers']:.2f} ms/delivery, "
                      f"cores busy {result['cores_ours']:.2f} ours / "
                      f"{result['cores_machine']:.2f} machine  "
                      f"[{time.monotonic() - started:.0f} s]", flush=True)
        stack.stop_all(["relay", *runner.workers])
        runner.redis.close()
        results = {
            "config": {"database": stack.db_kind, "redis_url": args.redis_url, "n": args.n,
                       "repeat": args.repeat, "order": order, "concurrency": args.concurrency,
                       "latencies_ms": latencies, "cpus": os.cpu_count(),
                       "relay_max_queued": RelaySettings.from_env().max_queued,
                       "relay_poll_interval_s": RelaySettings.from_env().poll_interval_s,
                       "load_start": load_start, "python": platform.python_version(),
                       "smoke": args.smoke},
            "points": summarize(runs, latencies, args.ns),
            "runs": runs,
            "load_end": _loadavg(),
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        print()
        print(render(results))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults: {RESULTS.relative_to(ROOT)}   process logs: "
              f"{stack.log_dir.relative_to(ROOT)}/   ({results['elapsed_s']:.0f} s)")
        return 0

    return run_guarded("bench scaleout", stack, args.max_seconds, body)


if __name__ == "__main__":
    raise SystemExit(main())
