"""``python -m bench validation``: how long ``enqueue`` takes to accept or refuse a payload,
for payloads up to the size cap built to be expensive. Target: every one in ≤ 50 ms.

Each case runs through the public ``enqueue`` (intake walk, size cap, schema, INSERT for the
valid ones) in a transaction that is rolled back, on a scratch SQLite database. The baseline,
measured in the same run on the same payload, is what enqueue used before this issue: the
``jsonschema`` validator (Draft 2020-12, all errors collected and sorted, as it did) —
stopped at ``--baseline-budget`` seconds, since it is quadratic on large arrays of objects.
Results go to ``var/bench-validation.json``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy.orm import Session

import schemas
from outbox import InvalidMessage, enqueue
from outbox.config import max_payload_bytes
from outbox.db import make_engine
from outbox.migrations import upgrade

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "var" / "bench-validation.json"
TARGET_MS = 50.0


def cases(cap: int) -> list[tuple[str, str, dict]]:
    """(name, provider.operation, payload): typical ones, then the expensive ones, each at or
    just under the cap of ``cap`` bytes."""
    mail = {"subject": "s", "text": "t"}
    n_objects = cap // 24          # {"email":"aNNNN@x.io"} ≈ 24 bytes each
    return [
        ("charge, typical", "payments.charge",
         {"amount": 1999, "currency": "usd", "customer": "cus_1", "metadata": {"order": "42"}}),
        ("email, 50 recipients (valid maximum)", "email.send",
         {"to": [{"email": f"a{i}@example.com", "name": f"N {i}"} for i in range(50)], **mail}),
        (f"email, {n_objects:,} recipient objects", "email.send",
         {"to": [{"email": f"a{i}@x.io"} for i in range(n_objects)], **mail}),
        ("email, 2,000 recipient objects (the issue's case)", "email.send",
         {"to": [{"email": f"a{i}@x.io"} for i in range(2000)], **mail}),
        ("email, 200,000-character text (valid)", "email.send",
         {"to": "a@example.com", "subject": "s", "text": "x" * 200_000}),
        ("email, address built to backtrack", "email.send",
         {"to": "a@" + "a-" * 125 + "!", **mail}),
        ("charge, metadata 50 × 500 characters (valid)", "payments.charge",
         {"amount": 1, "currency": "usd",
          "metadata": {f"k{i}": "v" * 500 for i in range(50)}}),
        ("charge, metadata of 4,990 one-key objects", "payments.charge",
         {"amount": 1, "currency": "usd", "metadata": {"k": [{"a": 1}] * 4990}}),
        ("charge, metadata of 9,990 strings of 24 characters", "payments.charge",
         {"amount": 1, "currency": "usd", "metadata": {"k": ["s" * 24] * 9990}}),
        ("charge, metadata of one huge list of small integers", "payments.charge",
         {"amount": 1, "currency": "usd", "metadata": {"k": list(range(cap // 8))}}),
        ("charge, description of tiny objects at the cap", "payments.charge",
         {"amount": 1, "currency": "usd", "description": [{}] * (cap // 4)}),
        ("charge, nested 5,000 deep", "payments.charge",
         {"amount": 1, "currency": "usd", "metadata": _nested(5000)}),
        ("charge, a 100 MB string (over the cap)", "payments.charge",
         {"amount": 1, "currency": "usd", "description": "x" * 100_000_000}),
    ]


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _time_validation(name: str, payload: dict) -> float:
    """The validation work alone, through the public parts enqueue runs: intake, schema."""
    from outbox.payload import canonical_json

    started = time.perf_counter()
    try:
        canonical_json(payload, max_bytes=max_payload_bytes())
        schemas.validate_operation(*name.split("."), payload)
    except (InvalidMessage, schemas.SchemaError):
        pass
    return time.perf_counter() - started


def _time_enqueue(session: Session, name: str, payload: dict, i: int) -> tuple[float, str]:
    provider, operation = name.split(".")
    started = time.perf_counter()
    try:
        enqueue(session, provider=provider, operation=operation, payload=payload,
                idempotency_key=f"bench-validation-{i}")
        verdict = "accepted"
    except InvalidMessage as exc:
        verdict = f"refused at {getattr(exc, 'path', '?')}"
    elapsed = time.perf_counter() - started
    session.rollback()
    return elapsed, verdict


class _Budget(Exception):
    pass


def _time_jsonschema(name: str, payload: dict, budget_s: float) -> float | None:
    """What the old validation cost (all errors, sorted); None if over ``budget_s``."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schemas.load("operations", name))

    def stop(*_):
        raise _Budget

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    started = time.perf_counter()
    try:
        sorted(validator.iter_errors(payload), key=lambda e: list(map(str, e.absolute_path)))
        return time.perf_counter() - started
    except (_Budget, RecursionError):
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench validation", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="runs per case; the median counts")
    p.add_argument("--baseline-budget", type=float, default=2.0,
                   help="seconds the jsonschema baseline may take per case")
    p.add_argument("--smoke", action="store_true", help="one run per case, short baseline")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeat, args.baseline_budget = 1, 0.2
    cap = max_payload_bytes()
    with tempfile.TemporaryDirectory(prefix="outbox-bench-validation-") as tmp:
        url = f"sqlite:///{tmp}/outbox.db"
        upgrade(url)
        engine = make_engine(url)
        rows = []
        with Session(engine) as session:
            enqueue(session, provider="payments", operation="charge",   # a first enqueue
                    payload={"amount": 1, "currency": "usd"}, idempotency_key="warm-up")
            session.rollback()
            for provider, operations in schemas.operations().items():   # compile each schema
                for operation in operations:
                    try:
                        schemas.validate_operation(provider, operation, {})
                    except schemas.SchemaError:
                        pass
            for i, (label, name, payload) in enumerate(cases(cap)):
                timings, checks, verdict = [], [], ""
                for r in range(args.repeat):
                    elapsed, verdict = _time_enqueue(session, name, payload, i * 100 + r)
                    timings.append(elapsed)
                    checks.append(_time_validation(name, payload))
                before = _time_jsonschema(name, payload,
                                          args.baseline_budget) if "100 MB" not in label else None
                rows.append({"case": label, "verdict": verdict,
                             "enqueue_ms": round(statistics.median(timings) * 1000, 3),
                             "validation_ms": round(statistics.median(checks) * 1000, 3),
                             "jsonschema_ms": None if before is None else round(before * 1000, 3)})
        engine.dispose()
    worst = max(r["enqueue_ms"] for r in rows)
    print(f"payload validation (cap {cap:,} bytes; median of {args.repeat}); target: enqueue "
          f"accepts or refuses each in ≤ {TARGET_MS:g} ms")
    print(f"    {'case':<60}{'verdict':<28}{'enqueue':>9}{'checks':>9}{'before':>9}{'ratio':>8}")
    for r in rows:
        before = r["jsonschema_ms"]
        shown = f"{before:>9.2f}" if before is not None else f"{'>' + format(args.baseline_budget * 1000, '.0f'):>9}"
        ratio = f"{r['validation_ms'] / before:>8.3f}" if before else f"{'—':>8}"
        print(f"    {r['case']:<60}{r['verdict'][:27]:<28}{r['enqueue_ms']:>9.2f}"
              f"{r['validation_ms']:>9.2f}{shown}{ratio}")
    print("    (ms; checks = intake + schema; before = jsonschema, as enqueue validated until "
          "issue 6; ratio = checks ÷ before)")
    verdict = "target met" if worst <= TARGET_MS else "MISSED"
    print(f"worst case {worst:.2f} ms ÷ {TARGET_MS:g} ms budget = {worst / TARGET_MS:.2f}: {verdict}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cap_bytes": cap, "repeat": args.repeat, "cases": rows,
                                   "worst_ms": worst, "target_ms": TARGET_MS}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
