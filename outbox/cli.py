"""The ``outbox`` command line. Every listing has ``--json``.

    outbox db upgrade
    outbox relay [--once]
    outbox status [--json]
    outbox show ID [--json]
    outbox enqueue PROVIDER OPERATION --key K --payload JSON
    outbox dead list [--provider P] [--error-class C] [--since T] [--json]
    outbox dead redrive (ID... | --all) [filters] --reason TEXT [--dry-run]
    outbox dead discard ID... --reason TEXT
    outbox sandbox [--host H] [--port N]

Exit status: 0 done, 1 some messages could not be acted on, 2 bad input.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from . import config, deadletters, dispatch, relay, status
from .clock import iso, utcnow
from .db import make_engine, make_sessionmaker
from .enqueue import enqueue
from .errors import MessageNotFound, OutboxError
from .models import Attempt, AuditEntry, Message


def _parse_since(text: str) -> datetime:
    """``30m``, ``2h``, ``7d`` (ago) or an ISO timestamp (UTC if no zone)."""
    match = re.fullmatch(r"(\d+)\s*([smhd])", text.strip())
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
        return utcnow() - timedelta(**{unit: int(match[1])})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: use e.g. 30m, 2h, 7d or 2026-11-21T10:00:00Z") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def _actor(args) -> str:
    return args.actor or os.environ.get("OUTBOX_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def _emit(args, data, lines) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        for line in lines:
            print(line)


def _message_dict(m: Message) -> dict:
    return {
        "id": m.id, "provider": m.provider, "operation": m.operation, "status": m.status,
        "idempotency_key": m.idempotency_key, "correlation_id": m.correlation_id,
        "attempts": m.attempts, "rate_limited": m.rate_limited_count,
        "next_attempt_at": iso(m.next_attempt_at), "created_at": iso(m.created_at),
        "delivered_at": iso(m.delivered_at), "dead_at": iso(m.dead_at),
        "last_error_class": m.last_error_class, "last_status_code": m.last_status_code,
        "last_error": m.last_error, "provider_ref": m.provider_ref,
    }


# ---- commands ---------------------------------------------------------------

def cmd_db_upgrade(args, sessions):
    from .migrations import upgrade

    upgrade(config.database_url())
    print(f"database at head: {_safe_url(config.database_url())}")


def cmd_relay(args, sessions):
    engine = sessions.kw["bind"]   # the sessionmaker's engine
    settings = config.RelaySettings.from_env()
    disp = dispatch.dispatcher()
    if disp.publisher is None:
        raise OutboxError("no publisher is installed (is the package installed with `pip install -e .`?)")
    if args.once:
        print(f"published {relay.run_once(engine, disp, settings)}")
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("outbox").info("relay started on %s", _safe_url(config.database_url()))
    relay.run(engine, disp, settings, stop)


def _protection(names) -> dict:
    """Each provider's shared limiter, quota and breaker state (from Redis)."""
    from integrations.registry import get_provider, known_providers

    snapshots = {}
    for name in sorted(set(names) | set(known_providers())):
        try:
            snapshots[name] = get_provider(name).protection.snapshot()
        except Exception as exc:   # status must answer even when a provider is misconfigured
            snapshots[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return snapshots


def _protection_line(name: str, p: dict) -> str:
    if "error" in p and "breaker" not in p:
        return f"{name:<12}protection unavailable: {p['error']}"
    breaker = p.get("breaker") or {}
    parts = [f"limit {p.get('rate_limit') or 'none'}"]
    parts += [f"{op} {spec}" for op, spec in (p.get("operation_rate_limits") or {}).items()]
    if p.get("paused_for_s"):
        parts.append(f"PAUSED {p['paused_for_s']:.1f}s (429)")
    if p.get("max_concurrency"):
        parts.append(f"in flight {p.get('permits_in_use')}/{p['max_concurrency']}")
    if p.get("daily_quota"):
        state = "EXHAUSTED, waits for" if p.get("quota_remaining") == 0 else "resets in"
        parts.append(f"quota {p.get('quota_used')}/{p['daily_quota']} ({state} "
                     f"{(p.get('quota_resets_in_s') or 0) / 3600:.1f} h)")
    state = breaker.get("state", "?")
    detail = f"{breaker.get('failures', 0)} failure(s) in window"
    if state != "closed" and breaker.get("half_open_in_s") is not None:
        detail += f", half-open in {breaker['half_open_in_s']:.1f}s"
    parts.append(f"breaker {state.upper() if state != 'closed' else state} ({detail})")
    if "error" in p:
        parts.append(f"(partial: {p['error']})")
    return f"{name:<12}" + "   ".join(parts)


def cmd_status(args, sessions):
    with sessions() as session:
        data = status.report(session)
    data["protection"] = _protection(data["providers"])
    for name, p in data["protection"].items():
        if (p.get("breaker") or {}).get("state", "closed") != "closed":   # seed: breaker open
            data["level"] = "critical"
            if name in data["providers"]:
                data["providers"][name]["checks"]["breaker"] = "critical"
                data["providers"][name]["level"] = "critical"
    lines = [f"outbox status: {data['level']}   dead letters awaiting action: {data['dead_awaiting']}"]
    header = f"{'provider':<12}{'pending':>8}{'queued':>8}{'flight':>8}{'retry@':>8}{'deliv.':>9}" \
             f"{'dead':>6}{'disc.':>6}{'oldest due':>12}{'err 5m':>8}  level"
    lines.append(header)
    for name, e in data["providers"].items():
        s = e["by_status"]
        lines.append(f"{name:<12}{s['pending'] - e['retry_scheduled']:>8}{s['queued']:>8}"
                     f"{s['in_flight']:>8}{e['retry_scheduled']:>8}{s['delivered']:>9}"
                     f"{s['dead']:>6}{s['discarded']:>6}{e['oldest_due_age_s']:>11.1f}s"
                     f"{e['error_rate_5m'] * 100:>7.1f}%  {e['level']}")
    if not data["providers"]:
        lines.append("(no messages yet)")
    lines.append("protection (shared by every worker):")
    lines += ["  " + _protection_line(name, p) for name, p in data["protection"].items()]
    _emit(args, data, lines)


def cmd_show(args, sessions):
    with sessions() as session:
        message = session.get(Message, args.id)
        if message is None:
            raise MessageNotFound(f"no message {args.id}")
        attempts = session.scalars(select(Attempt).where(Attempt.message_id == args.id)
                                   .order_by(Attempt.id)).all()
        audit = session.scalars(select(AuditEntry).where(AuditEntry.message_id == args.id)
                                .order_by(AuditEntry.id)).all()
    data = _message_dict(message) | {
        "attempts_timeline": [{
            "started_at": iso(a.started_at), "duration_ms": round(a.duration_ms, 1),
            "outcome": a.outcome, "status_code": a.status_code, "error_class": a.error_class,
            "error": a.error, "next_attempt_at": iso(a.next_attempt_at), "worker": a.worker,
            "lease_token": a.lease_token} for a in attempts],
        "audit": [{"at": iso(e.at), "actor": e.actor, "action": e.action, "reason": e.reason}
                  for e in audit],
    }
    lines = [f"{message.label}  [{message.status}]",
             f"  key {message.idempotency_key}   attempts {message.attempts}   "
             f"created {iso(message.created_at)}   next {iso(message.next_attempt_at)}"]
    if message.last_error:
        lines.append(f"  last error: {message.last_error_class} {message.last_error}")
    lines.append("  attempts:")
    for a in data["attempts_timeline"]:
        nxt = f" -> next {a['next_attempt_at']}" if a["next_attempt_at"] else ""
        err = f" {a['error_class']}: {a['error']}" if a["error_class"] else ""
        code = a["status_code"] or "---"
        lines.append(f"    {a['started_at']} {a['duration_ms']:>8.1f} ms  {a['outcome']:<9} {code}"
                     f"{err}{nxt}")
    for e in data["audit"]:
        lines.append(f"  audit: {e['at']} {e['actor']} {e['action']}: {e['reason']}")
    _emit(args, data, lines)


def cmd_enqueue(args, sessions):
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise OutboxError(f"--payload is not valid JSON: {exc.msg} at position {exc.pos}") from None
    with sessions() as session:
        message = enqueue(session, provider=args.provider, operation=args.operation,
                          payload=payload, idempotency_key=args.key,
                          correlation_id=args.correlation_id)
        session.commit()
        data = _message_dict(message)
    dispatch.dispatcher().flush()
    _emit(args, data, [f"{message.label} {message.status}"])


def _filters(args) -> deadletters.DeadFilter:
    return deadletters.DeadFilter(provider=args.provider, error_class=args.error_class,
                                  since=args.since)


def cmd_dead_list(args, sessions):
    with sessions() as session:
        rows = deadletters.list_dead(session, _filters(args), limit=args.limit)
    data = [_message_dict(m) for m in rows]
    lines = [f"{iso(m.dead_at)}  {m.label}  {m.last_status_code or '---'} "
             f"{m.last_error_class}: {m.last_error}" for m in rows]
    lines.append(f"{len(rows)} dead letter(s)")
    _emit(args, data, lines)


def _report_actions(args, results) -> int:
    data = [r.__dict__ for r in results]
    lines = [f"{'ok  ' if r.done else 'skip'} {r.label or r.id}: {r.note}" for r in results]
    done = sum(r.done for r in results)
    verb = "would act on" if getattr(args, "dry_run", False) else "acted on"
    lines.append(f"{verb} {done} of {len(results)} message(s)")
    _emit(args, data, lines)
    return 0 if done == len(results) else 1


def cmd_dead_redrive(args, sessions):
    if bool(args.ids) == bool(args.all):
        raise OutboxError("name message ids or --all (with optional filters), not both")
    with sessions() as session:
        results = deadletters.redrive(session, reason=args.reason, actor=_actor(args),
                                      ids=args.ids or None,
                                      where=_filters(args) if args.all else None,
                                      dry_run=args.dry_run)
    dispatch.dispatcher().flush()
    return _report_actions(args, results)


def cmd_dead_discard(args, sessions):
    with sessions() as session:
        results = deadletters.discard(session, reason=args.reason, actor=_actor(args),
                                      ids=args.ids)
    return _report_actions(args, results)


def cmd_sandbox(args, sessions):
    from sandbox.server import main as sandbox_main

    return sandbox_main(["--host", args.host, "--port", str(args.port)])


def _safe_url(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


# ---- parser -----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outbox", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("relay", help="publish due and lost messages, forever")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(func=cmd_relay)

    p = sub.add_parser("status", help="depths, ages, dead letters, health")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("show", help="one message and its attempt timeline")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("enqueue", help="enqueue one operation")
    p.add_argument("provider")
    p.add_argument("operation")
    p.add_argument("--key", required=True, help="idempotency key")
    p.add_argument("--payload", required=True, help="JSON object")
    p.add_argument("--correlation-id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_enqueue)

    dead = sub.add_parser("dead", help="dead letters").add_subparsers(dest="dead_command",
                                                                       required=True)

    def filters(p):
        p.add_argument("--provider")
        p.add_argument("--error-class")
        p.add_argument("--since", type=_parse_since, help="30m, 2h, 7d or an ISO time")
        p.add_argument("--json", action="store_true")

    p = dead.add_parser("list", help="list dead letters")
    filters(p)
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(func=cmd_dead_list)

    p = dead.add_parser("redrive", help="send dead letters again")
    p.add_argument("ids", nargs="*")
    p.add_argument("--all", action="store_true", help="every dead letter matching the filters")
    filters(p)
    p.add_argument("--reason", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--actor", help="recorded in the audit trail (default: user@host)")
    p.set_defaults(func=cmd_dead_redrive)

    p = dead.add_parser("discard", help="give up on dead letters")
    p.add_argument("ids", nargs="+")
    p.add_argument("--reason", required=True)
    p.add_argument("--actor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dead_discard)

    p = sub.add_parser("sandbox", help="run the fake providers on loopback")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("SANDBOX_PORT", "8100")))
    p.set_defaults(func=cmd_sandbox)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("OUTBOX_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command in ("sandbox",):
            return args.func(args, None) or 0
        engine = make_engine()
        return args.func(args, make_sessionmaker(engine)) or 0
    except OutboxError as exc:
        print(f"outbox: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # `outbox dead list --json | head`: the reader left, not an error
        sys.stderr.close()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
