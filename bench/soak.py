"""``python -m bench.soak``: a steady load for minutes, with a fault every minute; one line.

The stack of ``bench.chaos`` (real relay and Celery workers at default recovery settings,
the sandbox in its own process, a scratch PostgreSQL database, a private Redis). This
process commits ``rate`` business transactions per second (an order and its charge) for
``minutes``; every ``fault_every`` seconds it injects the next fault of the rotation:

    worker_kill (SIGKILL worker2, restarted at once) · relay_kill (SIGKILL, restarted) ·
    redis_flush (FLUSHALL) · pg_outage (connections killed, refused for ``pg_down_s``) ·
    provider_503 (every request 503 for ``provider_down_s``)

(``--set faults=…`` picks some of them.)

worker1 is never killed: it is the witness for memory growth.

Pruning: on code that has retention (``outbox db prune``), the relay prunes on its own
schedule, set here to every ``prune_interval`` keeping ``prune_after`` of delivered
history (``OUTBOX_PRUNE_INTERVAL``, ``OUTBOX_PRUNE_DELIVERED_AFTER``). On code without it the
table grows, and the line says ``prune=unavailable``: the hook is ``PRUNE_ENV`` below
(or ``--prune off`` to measure the growth on purpose).

Figures (the chaos line; see ``bench.chaos``), with these must-shows:

* p99 commit → ack ≤ 2 s: commit → the provider's answer to the request that made the effect;
* 0 lost (committed, no effect at the provider by the deadline: load end + ``drain``);
* 0 duplicate effects;
* worker RSS growth ≤ 10 %: worker1's resident memory at the end vs after ``warm_s``;
* table flat: the outbox tables' size on disk at the end ≤ 110 % of their size at
  half-time (``table_growth`` is that ratio − 1; the sizes are sampled every 10 s).

Exit status: 0 every must-show held, 1 one failed, 2 the run could not be made, 3 timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .chaos import OUT_DIR, _common, _drain, _setup, _start
from .chaos_stack import Figures, code_version, note, rss_bytes, run_at
from .stack import run_guarded

FULL = dict(rate=50, minutes=10.0, fault_every=60.0, rate_limit=100, workers=2, threads=4,
            warm_s=60.0, drain=60, pg_down_s=3.0, provider_down_s=5.0,
            prune="auto", prune_after="120s", prune_interval="60s",
            faults="worker_kill,relay_kill,redis_flush,pg_outage,provider_503")
QUICK = dict(minutes=2.0, fault_every=20.0, warm_s=40.0, drain=45, prune_after="30s",
             prune_interval="15s")
FAULTS = ("worker_kill", "relay_kill", "redis_flush", "pg_outage", "provider_503")
# ``--set faults=worker_kill,relay_kill`` soaks with only some of them, in that order.
PRUNE_ENV = {"OUTBOX_PRUNE": "on", "OUTBOX_PRUNE_INTERVAL": "{prune_interval}",
             "OUTBOX_PRUNE_DELIVERED_AFTER": "{prune_after}"}


def _has_retention() -> bool:
    from .stack import ROOT

    return (ROOT / "outbox" / "retention.py").exists()


def soak(p: dict) -> int:
    prune = p["prune"]
    if prune == "auto":
        prune = "relay" if _has_retention() else "unavailable"
    env = ({k: v.format(**p) for k, v in PRUNE_ENV.items()} if prune == "relay"
           else {"OUTBOX_PRUNE": "off"} if prune == "off" and _has_retention() else {})
    faults = [f.strip() for f in p["faults"].split(",") if f.strip()]
    if not faults or set(faults) - set(FAULTS):
        print(f"soak: faults must be some of {','.join(FAULTS)}", file=sys.stderr)
        return 2
    run = _setup("soak", p, env)
    stack = run.stack

    def body() -> int:
        _start(run)
        seconds = p["minutes"] * 60
        producer = run.producer(int(seconds * p["rate"]), p["rate"]).start()
        t0 = time.time()
        samples: list[tuple[float, int | None, int | None]] = []
        rss_base = None
        next_fault, next_sample, i = t0 + p["fault_every"], t0, 0
        while not producer.done:
            now = time.time()
            if now >= next_sample:
                try:
                    size = stack.table_bytes()
                except Exception:   # the database is down (a fault): no sample
                    size = None
                samples.append((now - t0, size, rss_bytes(stack.pid("worker1"))))
                next_sample += 10
                if rss_base is None and now - t0 >= p["warm_s"]:
                    rss_base = (stack.pid("worker1"), rss_bytes(stack.pid("worker1")))
            if now >= next_fault and now - t0 < seconds - 5:
                kind = faults[i % len(faults)]
                _inject(stack, kind, p)
                note(f"soak: {now - t0:.0f} s: {kind}")
                i += 1
                next_fault += p["fault_every"]
            time.sleep(0.2)
        producer.join()
        _drain(run, producer, time.time())
        fig = Figures("soak")
        _common(run, fig, producer, ack=True)
        # memory: worker1 only, same process all along
        pid, base = rss_base or (None, None)
        fig.extra.pop("rss_mb", None)
        if pid and base and stack.pid("worker1") == pid:
            now = rss_bytes(pid)
            fig.rss_growth = (now - base) / base
            fig.extra["rss_mb"] = f"{base / 2**20:.0f}->{now / 2**20:.0f}"
        else:
            fig.rss_growth = None
        sizes = [(t, s) for t, s, _ in samples if s is not None]
        mid = min(sizes, key=lambda ts: abs(ts[0] - seconds / 2))[1] if sizes else None
        end = stack.table_bytes()
        growth = (end - mid) / mid if mid else float("nan")
        lat = fig.latencies
        over = sum(1 for t in lat if t > 2.0) / len(lat) if lat else 0.0
        fig.extra.update(rate=p["rate"], minutes=p["minutes"], over_2s=f"{over * 100:.1f}%",
                         prune=prune,
                         table_mid=f"{mid / 1e6:.1f}MB" if mid else "n/a",
                         table_growth=f"{growth * 100:+.0f}%",
                         rows=sum(stack.status_counts().values()))
        fig.must(fig.p99_ms <= 2000, f"p99 commit->ack {fig.p99_ms:.0f} ms > 2000")
        fig.must(fig.rss_growth is not None and fig.rss_growth <= 0.10,
                 "worker RSS growth " + ("unknown" if fig.rss_growth is None
                                         else f"{fig.rss_growth * 100:+.1f}% > 10%"))
        fig.must(growth <= 0.10, f"table grew {growth * 100:+.0f}% over the second half "
                                 f"(prune={prune})")
        (OUT_DIR / "soak").mkdir(parents=True, exist_ok=True)
        (OUT_DIR / "soak" / "result.json").write_text(json.dumps(
            {**fig.as_dict(), "params": p, "samples": samples}, indent=2, default=str) + "\n")
        print(f"soak {fig.line()}", flush=True)
        return 0 if not fig.failures else 1

    max_s = int(p["minutes"] * 60 + p["drain"] + 600)
    return run_guarded("soak", stack, max_s, body)


def _inject(stack, kind: str, p: dict) -> None:
    if kind == "worker_kill":
        stack.kill("worker2")
        stack.record_fault(kind)
    elif kind == "relay_kill":
        stack.kill("relay")
        stack.record_fault(kind)
    elif kind == "redis_flush":
        stack.redis_flush()
    elif kind == "pg_outage":
        stack.pg_outage(p["pg_down_s"])
    elif kind == "provider_503":
        rule = stack.provider_down()
        time.sleep(p["provider_down_s"])
        stack.provider_up(rule)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 minutes, a fault every 20 s")
    ap.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                    help=f"change one setting (defaults: {FULL})")
    ap.add_argument("--at", metavar="COMMIT", help="run on this commit's code (see bench.chaos)")
    args = ap.parse_args(argv)
    if args.at:
        rest = [a for i, a in enumerate(argv) if a != "--at" and not a.startswith("--at=")
                and (i == 0 or argv[i - 1] != "--at")]
        return run_at(args.at, "bench.soak", rest)
    p = {**FULL, **(QUICK if args.quick else {})}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in p:
            ap.error(f"unknown setting {key} (known: {sorted(p)})")
        p[key] = type(p[key])(value)
    print(f"soak: {p['rate']}/s for {p['minutes']:g} min, a fault every {p['fault_every']:g} s "
          f"({p['faults']}), on {code_version()}", flush=True)
    return soak(p)


if __name__ == "__main__":
    raise SystemExit(main())
