"""``python -m bench.chaos``: fault scenarios against the real stack, one line of figures each.

The stack: the relay (``outbox relay``) and Celery worker processes (``celery -A tasks
worker -Q payments -P threads``) as the Procfile runs them, at default recovery settings
(lease, requeue, grace), the sandbox payments provider in its own process, a scratch
PostgreSQL database (``BENCH_DATABASE_URL``, default the local server's ``test``) and a
private ``redis-server`` on a free loopback port (no persistence), so that flushing or
killing it touches nobody else. The application is this process: a producer thread runs
business transactions (an order row and its ``payments.charge`` enqueue, committed or
rolled back) and records each commit's time. Effects are counted at the sandbox (it
deduplicates by idempotency key, as Stripe does: a retried attempt is not a second effect).
Everything targets 127.0.0.1; every process is killed at the end, the scratch database
dropped and the private Redis stopped.

Scenarios (``--quick`` runs each with short sizes; ``--set SCENARIO.PARAM=VALUE`` changes
one size, see ``SCENARIOS``):

=============== =========================================================================
relay_kill      N business transactions, 10 % rolled back, 10 % of commits losing their
                after-commit dispatch (the app died after commit: only the relay sends
                those); the relay SIGKILLed every 2 s and restarted. Must show: rows =
                commits, 0 rolled-back rows, 0 rolled-back sent, 0 lost, 0 duplicates.
worker_kill     N deliveries at a steady rate; the oldest worker SIGKILLed every 2 s and
                restarted at once. Must: 0 lost, 0 duplicate effects, recover_s <= 30.
redis_flush     a backlog of N committed at once, drained at the provider's rate limit;
                FLUSHALL 3x during the drain. Must: 0 lost, 0 duplicates, drained <= 30 s
                after the backlog's own time (N / rate limit, from the first commit).
redis_restart   the same, the Redis server SIGKILLed and restarted empty 3x.
pg_outage       N deliveries at a steady rate; PostgreSQL gone twice mid-run for this
                database: every connection killed (pg_terminate_backend) and new ones
                refused for a few seconds (ALLOW_CONNECTIONS false); the shared server
                is not restarted. Must: 0 lost, 0 duplicates.
provider_503    a steady load; the provider answers 503 to everything for 60 s. Must: at
                most 1 request per half-open interval while the breaker is open, none
                while it is open, 0 dead letters, 0 lost afterwards.
redrive         N declined charges dead-lettered; cards fixed; two ``outbox dead redrive
                --all --provider payments`` processes started at once. Must: exactly one
                effect per key, one re-drive each in the audit trail.
=============== =========================================================================

The line's figures:

* ``lost``: committed keys with no effect at the provider by the deadline (the end of the
  faults, plus the remaining backlog's own time, plus ``drain`` seconds). ``undelivered=``
  then gives those rows' states (``queued:12`` = still waiting for the relay's requeue).
* ``dup``: effects beyond the first per key, plus effects of keys never committed.
* ``recover_s``: for each fault at time t (a kill or flush: its moment; an outage: the
  moment the service answered again), the affected messages are those committed by t
  whose effect had not reached the provider by t; that fault's recovery is the time from t
  until the last of them reached the provider, minus their own time at the rate limit
  (count / limit). recover_s is the worst fault's (``inf`` if one never arrived).
* ``max_1s``: the most payments requests the provider received in any sliding 1 s window.
* ``p99_ms``: commit → arrival of the effect's request at the provider, 99th percentile
  (redrive: re-drive start → arrival).
* ``rss_growth``: resident memory of the worker processes that lived through the whole
  run, end vs after warm-up (n/a when every worker was killed on purpose).
* ``table``: bytes on disk of the outbox tables and their indexes at the end.

Exit status: 0 every must-show held, 1 one failed, 2 the run could not be made, 3 timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC

from .chaos_stack import (
    ChaosStack,
    Figures,
    Observed,
    Producer,
    code_version,
    delivery_figures,
    note,
    rss_bytes,
    run_at,
    wait_delivered,
)
from .stack import BIN, ROOT, BenchError, run_guarded, wait_until

OUT_DIR = ROOT / "var" / "chaos"

# name → (full sizes, quick overrides). Rates are per second; times in seconds.
# ``drain``: how long past the faults' end (and the backlog's own time) deliveries may take
# before the missing ones count as lost; ``max_s``: hard stop for the scenario.
SCENARIOS: dict[str, tuple[dict, dict]] = {
    "relay_kill": (dict(n=10_000, rate=80, rollback=0.10, lost_dispatch=0.10, kill_every=2.0,
                        rate_limit=100, workers=2, threads=4, drain=330, max_s=1200),
                   dict(n=1000, drain=45, max_s=240)),
    # Four workers of two threads (the Procfile's eight threads): each lives 8 s between
    # kills, longer than a worker takes to start on a loaded 2-core machine (4-8 s seen).
    "worker_kill": (dict(n=5_000, rate=40, kill_every=2.0, rate_limit=50, workers=4, threads=2,
                         drain=330, max_s=1000),
                    dict(n=400, drain=45, max_s=240)),
    "redis_flush": (dict(n=3_000, rate_limit=50, faults=3, workers=2, threads=4, drain=330,
                         max_s=900),
                    dict(n=500, drain=45, max_s=240)),
    "redis_restart": (dict(n=3_000, rate_limit=50, faults=3, down_s=2.0, workers=2, threads=4,
                           drain=330, max_s=900),
                      dict(n=500, drain=45, max_s=240)),
    "pg_outage": (dict(n=3_000, rate=40, rate_limit=50, outages=2, down_s=5.0, workers=2,
                       threads=4, drain=330, max_s=900),
                  dict(n=400, down_s=3.0, drain=45, max_s=240)),
    "provider_503": (dict(fault_s=60, before_s=5, after_s=5, rate=10, rate_limit=50,
                          open_s=15.0, workers=2, threads=4, drain=120, max_s=600),
                     dict(fault_s=16, open_s=6.0, drain=60, max_s=300)),
    "redrive": (dict(n=100, rate_limit=100, workers=2, threads=4, drain=120, max_s=400),
                dict(n=30, drain=60, max_s=200)),
}


@dataclass
class Run:
    """One scenario's stack, its sessions and its sizes."""

    name: str
    p: dict
    stack: ChaosStack
    sessions: object = None
    rss0: dict | None = None

    def producer(self, n: int, rate: float | None, **kw) -> Producer:
        return Producer(self.sessions, f"{self.name}-", n, rate, **kw)

    def worker_names(self) -> list[str]:
        return [n for n in self.stack.supervised if n.startswith("worker")]

    def snapshot_rss(self) -> None:
        self.rss0 = {n: (self.stack.pid(n), rss_bytes(self.stack.pid(n)))
                     for n in self.worker_names()}

    def rss(self) -> tuple[int, int]:
        """Summed RSS (before, now) of the workers still running as the same process."""
        before = after = 0
        for name, (pid, rss) in (self.rss0 or {}).items():
            if pid is None or rss is None or self.stack.pid(name) != pid:
                continue
            now = rss_bytes(pid)
            if now is None:
                continue
            before, after = before + rss, after + now
        return before, after


def _setup(name: str, p: dict, extra_env: dict[str, str] | None = None) -> Run:
    import shutil

    log_dir = OUT_DIR / name
    shutil.rmtree(log_dir, ignore_errors=True)
    env = {"OUTBOX_PAYMENTS_RATE_LIMIT": f"{p['rate_limit']}/s", **(extra_env or {})}
    if "open_s" in p:   # the breaker's open interval (15 s, its default, in the full run)
        env["OUTBOX_PAYMENTS_BREAKER_OPEN"] = f"{p['open_s']:g}"
    stack = ChaosStack(name, p["workers"], p["threads"], log_dir, env)
    return Run(name, p, stack)


def _start(run: Run, relay: bool = True) -> None:
    """Services, schema, workers, relay; a warm-up of 16 deliveries; the sandbox reset."""
    from outbox.db import make_sessionmaker

    from .measure import app_metadata

    stack = run.stack
    note(f"{run.name}: starting private Redis, sandbox, scratch PostgreSQL database")
    stack.start_services()
    engine = stack.open_engine()
    app_metadata.create_all(engine)
    run.sessions = make_sessionmaker(engine)
    note(f"{run.name}: starting {stack.n_workers} workers (-c {stack.concurrency}) and the relay")
    stack.start_system(relay=relay)
    warm = Producer(run.sessions, "warm-", 16, None).start()
    warm.join(60)
    if not wait_delivered(stack, warm.commits, time.time() + 60, "warm-up deliveries"):
        raise BenchError(f"warm-up deliveries did not arrive; see {stack.log_dir}")
    stack.sandbox_reset()
    run.snapshot_rss()


def _periodic(every: float, action, until) -> int:
    """Call ``action()`` every ``every`` seconds until ``until()``; returns how many times."""
    count, next_at = 0, time.monotonic() + every
    while not until():
        time.sleep(max(0.0, min(0.1, next_at - time.monotonic())))
        if time.monotonic() >= next_at:
            action()
            count += 1
            next_at += every
    return count


def _drain(run: Run, producer: Producer, faults_end: float) -> None:
    """Wait until every commit reached the provider, or the deadline: the faults' end plus
    what was outstanding then at the rate limit, plus ``drain``."""
    rate = run.p["rate_limit"]
    effects = run.stack.sandbox_stats(log=False)["effects_by_key"]
    outstanding = sum(1 for k in producer.commits if not effects.get(k))
    deadline = max(faults_end, time.time()) + outstanding / rate + run.p["drain"]
    note(f"{run.name}: {outstanding} outstanding; waiting for them until "
         f"{time.strftime('%H:%M:%S', time.localtime(deadline))}")
    wait_delivered(run.stack, producer.commits, deadline)
    time.sleep(1.0)   # a late duplicate in flight has time to land


def _common(run: Run, fig: Figures, producer: Producer, ack: bool = False) -> Observed:
    observed = Observed.read(run.stack)
    delivery_figures(fig, run.stack, producer, observed, run.p["rate_limit"], ack=ack)
    before, after = run.rss()
    fig.rss_growth = (after - before) / before if before else None
    if before:
        fig.extra["rss_mb"] = f"{before / 2**20:.0f}->{after / 2**20:.0f}"
    fig.must(fig.lost == 0, f"{fig.lost} lost")
    fig.must(fig.dup == 0, f"{fig.dup} duplicate effects")
    crashed = {n: c for n, c in run.stack.unexpected_exits.items() if c}
    if crashed:   # exits we did not cause (restarted by the supervisor): see their logs
        fig.extra["crashes"] = ",".join(f"{n}:{c}" for n, c in sorted(crashed.items()))
    return observed


# ---- scenarios ---------------------------------------------------------------------------

def relay_kill(run: Run) -> Figures:
    p, stack = run.p, run.stack
    _start(run)
    producer = run.producer(p["n"], p["rate"], rollback_ratio=p["rollback"],
                            lost_dispatch_ratio=p["lost_dispatch"]).start()

    def kill():
        stack.kill("relay")
        stack.record_fault("relay_kill")

    kills = _periodic(p["kill_every"], kill, lambda: producer.done)
    producer.join()
    _drain(run, producer, time.time())
    fig = Figures("relay_kill")
    observed = _common(run, fig, producer)
    rows = stack.keys_in_table(run.name + "-")
    sent_rolled = sum(1 for k in producer.rolled_back if observed.requests_by_key.get(k))
    rows_rolled = len(rows & producer.rolled_back)
    fig.extra.update(rows=len(rows), rollbacks=len(producer.rolled_back),
                     rolled_back_rows=rows_rolled, rolled_back_sent=sent_rolled, kills=kills)
    fig.must(rows == set(producer.commits), f"rows {len(rows)} != commits {len(producer.commits)}")
    fig.must(rows_rolled == 0, f"{rows_rolled} rolled-back rows in the table")
    fig.must(sent_rolled == 0, f"{sent_rolled} rolled-back keys sent")
    return fig


def worker_kill(run: Run) -> Figures:
    p, stack = run.p, run.stack
    _start(run)
    producer = run.producer(p["n"], p["rate"]).start()

    def kill():
        name = stack.oldest_worker()
        stack.kill(name)
        stack.record_fault("worker_kill", detail=name)

    kills = _periodic(p["kill_every"], kill, lambda: producer.done)
    producer.join()
    _drain(run, producer, time.time())
    fig = Figures("worker_kill")
    _common(run, fig, producer)
    fig.extra["kills"] = kills
    fig.must(fig.recover_s <= 30, f"recover_s {fig.recover_s:.0f} > 30")
    return fig


def _redis(run: Run, restart: bool) -> Figures:
    p, stack = run.p, run.stack
    _start(run)
    own_s = p["n"] / p["rate_limit"]
    note(f"{run.name}: committing a backlog of {p['n']} (own time {own_s:.0f} s at "
         f"{p['rate_limit']}/s)")
    producer = run.producer(p["n"], None, batch=100).start()
    t0 = time.time()
    for i in range(p["faults"]):
        at = t0 + own_s * (i + 1) / (p["faults"] + 1)
        time.sleep(max(0.0, at - time.time()))
        if restart:
            stack.redis_restart(p["down_s"])
        else:
            stack.redis_flush()
        note(f"{run.name}: fault {i + 1}/{p['faults']}")
    producer.join()
    _drain(run, producer, time.time())
    fig = Figures(run.name)
    observed = _common(run, fig, producer)
    first = min(producer.commits.values())
    effects = [observed.first_effect[k] for k in producer.commits if k in observed.first_effect]
    drained_s = (max(effects) - first) if effects and not fig.lost else float("inf")
    over = drained_s - own_s
    fig.extra.update(own_s=round(own_s, 1), drained_s=round(drained_s, 1),
                     over_own_s=round(over, 1))
    fig.must(over <= 30, f"drained {over:.0f} s after the backlog's own time (> 30)")
    return fig


def redis_flush(run: Run) -> Figures:
    return _redis(run, restart=False)


def redis_restart(run: Run) -> Figures:
    return _redis(run, restart=True)


def pg_outage(run: Run) -> Figures:
    p, stack = run.p, run.stack
    _start(run)
    producer = run.producer(p["n"], p["rate"]).start()
    load_s = p["n"] / p["rate"]
    t0 = time.time()
    for i in range(p["outages"]):
        at = t0 + load_s * (i + 1) / (p["outages"] + 1)
        time.sleep(max(0.0, at - time.time()))
        fault = stack.pg_outage(p["down_s"])
        note(f"{run.name}: outage {i + 1}/{p['outages']}: {fault.detail}")
    producer.join()
    _drain(run, producer, time.time())
    fig = Figures("pg_outage")
    _common(run, fig, producer)
    fig.extra["app_db_errors"] = producer.db_errors
    return fig


def provider_503(run: Run) -> Figures:
    """Breaker probes are counted from the breaker's own transitions, read from Redis every
    0.1 s (each opening sets ``opened_at``): between an opening and the next, the provider
    may see at most ``probes`` (1) request, and none in the first ``open_s``. Requests that
    arrive within 0.25 s of an opening were admitted before it (in flight)."""
    import redis

    p, stack = run.p, run.stack
    _start(run)
    total_s = p["before_s"] + p["fault_s"] + p["after_s"]
    producer = run.producer(int(total_s * p["rate"]), p["rate"]).start()
    opens: set[float] = set()
    watching = threading.Event()
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=2)

    def watch():
        while not watching.wait(0.1):
            try:
                raw = client.hget("outbox:payments:breaker", "opened_at")
            except redis.RedisError:
                continue
            if raw:
                opens.add(int(raw) / 1e6)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(p["before_s"])
    rule = stack.provider_down()
    t_down = time.time()
    note(f"{run.name}: provider answers 503 for {p['fault_s']} s")
    time.sleep(p["fault_s"])
    stack.provider_up(rule)
    t_up = time.time()
    producer.join()
    watching.set()
    watcher.join(2)
    client.close()
    _drain(run, producer, t_up)
    fig = Figures("provider_503")
    observed = _common(run, fig, producer)
    arrivals = [t for t in observed.arrivals if t_down <= t < t_up]
    openings = sorted(t for t in opens if t_down <= t < t_up)
    probes_max = leak = 0
    for i, opened in enumerate(openings):
        end = openings[i + 1] if i + 1 < len(openings) else t_up
        leak += sum(1 for t in arrivals if opened + 0.25 <= t < min(end, opened + p["open_s"]))
        probes_max = max(probes_max, sum(1 for t in arrivals
                                         if opened + p["open_s"] <= t < end))
    before_open = sum(1 for t in arrivals if not openings or t < openings[0] + 0.25)
    dead = stack.status_counts(run.name + "-").get("dead", 0)
    fig.extra.update(requests_in_fault=len(arrivals), before_open=before_open,
                     openings=len(openings), probes_max=probes_max, requests_while_open=leak,
                     dead=dead)
    fig.must(bool(openings), "the breaker never opened")
    fig.must(probes_max <= 1, f"{probes_max} requests in one half-open interval (> 1)")
    fig.must(leak == 0, f"{leak} requests while the breaker was open")
    fig.must(dead == 0, f"{dead} dead letters")
    return fig


def redrive(run: Run) -> Figures:
    import sqlalchemy as sa

    from outbox import AuditEntry

    p, stack = run.p, run.stack
    _start(run)
    producer = run.producer(p["n"], None, customer="cus_declined", batch=50).start()
    producer.join()
    wait_until(lambda: stack.status_counts(run.name + "-").get("dead", 0) >= p["n"], 120, 0.5,
               what=f"{p['n']} dead letters")
    stack.sandbox_reset()   # count from here (the declines had no effect); then fix the cards
    stack.http.post(stack.sandbox_url + "/_sandbox/config", json={"declined_customers": []},
                    timeout=10).raise_for_status()
    env = {**os.environ, **stack.env()}
    args = [str(BIN / "outbox"), "dead", "redrive", "--all", "--provider", "payments",
            "--reason", "chaos: cards fixed", "--actor", "chaos"]
    t0 = time.time()
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0].decode(errors="replace") for proc in procs]
    codes = [proc.returncode for proc in procs]
    with stack._engine.connect() as conn:
        audits, first_at = conn.execute(
            sa.select(sa.func.count(), sa.func.min(AuditEntry.at))
            .where(AuditEntry.action == "redrive")).one()
    if first_at is not None:   # the first re-drive's commit (the CLIs take a while to start)
        t0 = first_at.replace(tzinfo=UTC).timestamp()
    stack.record_fault("redrive", t0)
    for key in producer.commits:      # latency and recovery count from the re-drive
        producer.commits[key] = t0
    _drain(run, producer, t0)
    fig = Figures("redrive")
    observed = _common(run, fig, producer)
    wrong = sum(1 for k in producer.commits if observed.effects_by_key.get(k, 0) != 1)
    fig.extra.update(dead_letters=p["n"], redrive_exit_codes="/".join(map(str, codes)),
                     redrives_audited=audits, keys_not_exactly_once=wrong)
    fig.must(wrong == 0, f"{wrong} keys without exactly one effect")
    fig.must(audits == p["n"], f"{audits} re-drives audited for {p['n']} dead letters")
    if any(c not in (0, 1) for c in codes):
        fig.failures.append("a redrive command failed: " + " | ".join(
            o.strip().splitlines()[-1] for o in outputs if o.strip()))
    return fig


RUNNERS = {"relay_kill": relay_kill, "worker_kill": worker_kill, "redis_flush": redis_flush,
           "redis_restart": redis_restart, "pg_outage": pg_outage,
           "provider_503": provider_503, "redrive": redrive}


# ---- driver ----------------------------------------------------------------------------

def params_for(name: str, quick: bool, overrides: dict[str, str]) -> dict:
    full, short = SCENARIOS[name]
    p = {**full, **(short if quick else {})}
    for key, value in overrides.items():
        scen, _, param = key.partition(".")
        if scen != name:
            continue
        if param not in p:
            raise SystemExit(f"bench.chaos: unknown parameter {key} (known: {sorted(p)})")
        p[param] = type(p[param])(value)
    return p


def run_one(name: str, p: dict) -> int:
    """Run scenario ``name`` in this process; print its line; save its figures."""
    run = _setup(name, p)
    result_path = OUT_DIR / name / "result.json"

    def body() -> int:
        fig = RUNNERS[name](run)
        print(f"chaos {fig.line()}", flush=True)
        result_path.write_text(json.dumps(
            {**fig.as_dict(), "params": p, "faults": [vars(f) for f in run.stack.faults],
             "rss_samples": run.stack.rss_samples}, indent=2, default=str) + "\n")
        return 0 if not fig.failures else 1

    return run_guarded(f"chaos {name}", run.stack, int(p["max_s"]), body)


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.chaos",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short sizes (make chaos-smoke)")
    ap.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="SCENARIO.PARAM=VALUE",
                    help="change one size, e.g. --set worker_kill.n=2000")
    ap.add_argument("--list", action="store_true", help="print the scenarios and their sizes")
    ap.add_argument("--at", metavar="COMMIT",
                    help="run on this commit's code (git archive to a temporary folder), not "
                         "on the working tree")
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _args(argv)
    if args.at:
        rest = [a for i, a in enumerate(argv) if a != "--at" and not a.startswith("--at=")
                and (i == 0 or argv[i - 1] != "--at")]
        return run_at(args.at, "bench.chaos", rest)
    if args.run_one:
        return run_one(args.run_one, json.loads(args.params))
    overrides = dict(s.split("=", 1) for s in args.set)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"bench.chaos: unknown scenario(s) {unknown}; known: {list(SCENARIOS)}",
              file=sys.stderr)
        return 2
    if args.list:
        for n in names:
            print(n, json.dumps(params_for(n, args.quick, overrides)))
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    commit = code_version()
    print(f"chaos: {'quick' if args.quick else 'full'} run of {', '.join(names)} on {commit}",
          flush=True)
    lines, worst = [], 0
    for name in names:
        p = params_for(name, args.quick, overrides)
        code, line = _child(name, p)
        lines.append(line)
        worst = max(worst, code)
    print("\nchaos summary:")
    for line in lines:
        print(f"  {line}")
    return worst


def _child(name: str, p: dict) -> tuple[int, str]:
    """The scenario in a fresh interpreter (celeryconfig reads REDIS_URL once, at import);
    killed if it outlives its ``max_s`` by a minute."""
    note(f"scenario {name}: {json.dumps(p)}")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "bench.chaos", "--run-one", name,
                             "--params", json.dumps(p)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    out = ""
    try:
        out, _ = proc.communicate(timeout=p["max_s"] + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    sys.stdout.write(out)
    sys.stdout.flush()
    line = next((ln[len("chaos "):] for ln in out.splitlines() if ln.startswith("chaos ")), None)
    code = proc.returncode if proc.returncode is not None else 3
    if line is None:
        line = f"{name:<15} ERROR  no figures (exit {code}); logs: {OUT_DIR / name}"
        code = max(code, 2)
    note(f"scenario {name}: exit {code} after {time.monotonic() - started:.0f} s")
    return code, line


if __name__ == "__main__":
    raise SystemExit(main())
