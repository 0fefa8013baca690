"""Orchestration: start the system, run (b), (a), (c), print the table, save JSON, clean up."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from .stack import ROOT, Stack, run_guarded

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
RESULTS = ROOT / "var" / "bench-results.json"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--n", type=int, default=2000, help="deliveries per side per round (a)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of (a)")
    p.add_argument("--iterations", type=int, default=3000, help="timed transactions per variant (b)")
    p.add_argument("--latency-seconds", type=float, default=10.0, help="open-loop duration (c)")
    p.add_argument("--concurrency", type=int, default=8, help="worker threads (-P threads -c N)")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
                   help="a Redis DB the bench may flush (default %(default)s)")
    p.add_argument("--broker-url", default=os.environ.get("BENCH_BROKER_URL") or None,
                   help="Celery broker other than that Redis, e.g. amqp://guest:guest@127.0.0.1"
                        ":5672/ (RabbitMQ: quorum queues, confirms; its payments queue is "
                        "purged). Default: the Redis DB")
    p.add_argument("--slow-provider-ms", type=float, default=50.0,
                   help="supplementary (a) with this sandbox latency, n/2 per side (0: skip)")
    p.add_argument("--quick", action="store_true", help="small counts, to check the harness")
    p.add_argument("--smoke", action="store_true",
                   help="tiny counts, seconds: only proves the benchmark still runs (make test)")
    p.add_argument("--max-seconds", type=int, default=420, help="hard stop for the whole run")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.iterations, args.latency_seconds = 300, 1, 400, 3.0
    if args.smoke:
        args.n, args.rounds, args.iterations, args.latency_seconds = 40, 1, 60, 1.0
        args.slow_provider_ms, args.max_seconds = 0, 120
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if not args.broker_url:   # the Redis DB is the broker, whatever the shell says
        os.environ.pop("CELERY_BROKER_URL", None)
    stack = Stack(args.redis_url, args.concurrency, ROOT / "var" / "bench-logs",
                  broker_url=args.broker_url)

    def body() -> int:
        started = time.monotonic()
        print("bench: starting sandbox, scratch database and Redis db "
              f"{args.redis_url.rsplit('/', 1)[-1]} …", flush=True)
        stack.check_redis()
        stack.check_broker()
        stack.start_sandbox()
        stack.make_database()
        # Before anything imports ``tasks``: celeryconfig reads REDIS_URL (and
        # CELERY_BROKER_URL) at import time.
        os.environ.update(stack.env())
        from outbox.db import make_sessionmaker

        from . import measure, report

        engine = stack.open_engine()   # disposed by stack.close()
        ctx = measure.Ctx(stack, engine, make_sessionmaker(engine))
        measure.setup_app_table(ctx)
        results: dict = {"config": {
            "database": stack.db_kind, "redis_url": args.redis_url,
            "broker": (args.broker_url or args.redis_url).split("@")[-1], "n": args.n,
            "rounds": args.rounds, "iterations": args.iterations,
            "latency_seconds": args.latency_seconds,
            "worker": f"1 process, -P threads -c {args.concurrency}, celeryconfig settings",
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "concurrency": args.concurrency,
        }}

        print(f"bench: (b) marginal request cost, {args.iterations} transactions per variant, "
              "no worker running …", flush=True)
        results["marginal"] = measure.marginal_cost(ctx, args.iterations)
        results["marginal_without_broker"] = measure.marginal_without_broker(
            ctx, min(1000, args.iterations))
        results["enqueue_breakdown_us"] = measure.enqueue_breakdown(ctx)
        measure.clean_after_marginal(ctx)

        print("bench: starting worker and relay, warming up …", flush=True)
        stack.start_worker()
        stack.start_relay()
        measure.warm_up(ctx)

        rounds = []
        for r in range(args.rounds):
            print(f"bench: (a) round {r + 1}/{args.rounds}: {args.n} bare tasks, "
                  f"then {args.n} outbox deliveries …", flush=True)
            rounds.append(measure.baseline_throughput(ctx, args.n, f"bare{r}"))
            rounds.append(measure.pipeline_throughput(ctx, args.n, f"pipe{r}"))
        pipe = statistics.median(x["per_s"] for x in rounds if x["side"] == "pipeline")
        bare = statistics.median(x["per_s"] for x in rounds if x["side"] == "baseline")
        results["throughput"] = {"rounds": rounds, "pipeline_per_s": pipe,
                                 "baseline_per_s": bare, "ratio": round(pipe / bare, 3)}

        if args.slow_provider_ms > 0:
            delay = args.slow_provider_ms / 1000
            half = max(50, args.n // 2)
            print(f"bench: (a') supplementary: provider latency {args.slow_provider_ms:g} ms, "
                  f"{half} per side …", flush=True)
            slow = [measure.baseline_throughput(ctx, half, "slowbare", provider_latency_s=delay),
                    measure.pipeline_throughput(ctx, half, "slowpipe", provider_latency_s=delay)]
            results["throughput_slow_provider"] = {
                "provider_latency_ms": args.slow_provider_ms, "rounds": slow,
                "ideal_per_s": round(args.concurrency / delay, 1),
                "ratio": round(slow[1]["per_s"] / slow[0]["per_s"], 3)}

        rate = pipe / 2
        print(f"bench: (c) open loop at {rate:.0f}/s (half the pipeline's throughput) for "
              f"{args.latency_seconds:g} s, then the bare path for half as long …", flush=True)
        lat_pipe = measure.latency(ctx, "pipeline", rate, args.latency_seconds, "pipe")
        lat_bare = measure.latency(ctx, "baseline", rate, args.latency_seconds / 2, "bare")
        results["latency"] = {"pipeline": lat_pipe, "baseline": lat_bare}
        results["elapsed_s"] = round(time.monotonic() - started, 1)

        print()
        print(report.render(results, stack))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults: {RESULTS.relative_to(ROOT)}   process logs: "
              f"{stack.log_dir.relative_to(ROOT)}/")
        return 0

    return run_guarded("bench", stack, args.max_seconds, body)
