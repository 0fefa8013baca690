"""The ``outbox`` command line. Every listing has ``--json``.

    outbox db upgrade
    outbox db prune [--delivered-older-than 30d] [--discarded-older-than 30d]
                    [--batch-size N] [--dry-run] [--json]
    outbox relay [--once]
    outbox status [--json]
    outbox show ID [--json]
    outbox enqueue PROVIDER OPERATION --key K --payload JSON
    outbox dead list [--provider P] [--operation O] [--error-class C] [--since T]
                     [--text ID|KEY|CORRELATION] [--limit N] [--json]
    outbox dead redrive (ID... | --all (--provider P | --any-provider) [filters])
                        --reason TEXT [--accept-duplicate-risk] [--dry-run]
    outbox dead discard ID... --reason TEXT
    outbox sandbox [--host H] [--port N]
    outbox web [--host H] [--port N]
    outbox inbound [--host H] [--port N] [--workers N]
    outbox poll [--once]
    outbox inbound list [--provider P] [--status S] [--limit N] [--json]
    outbox inbound show ID [--json]
    outbox crm connect [--timeout S]
    outbox secrets rotate [--json]
    outbox endpoints add URL --events E,… [--rate-limit 10/s] [--json]   (outbox.endpoints_cli)
    outbox endpoints list | disable ID [--reason TEXT] | enable ID | rotate-secret ID [--json]

Exit status: 0 done (``status``: ok), 1 some messages could not be acted on (``status``:
warning), 2 bad input, configuration, database not ready (``status``: critical). Errors
are one line on stderr, never a traceback (``OUTBOX_DEBUG=1`` shows one for a bug).
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
import traceback
from datetime import datetime, timedelta

from sqlalchemy import exc as sa_exc
from sqlalchemy import select

import schemas
from integrations import crm, oauth
from integrations.errors import ConfigurationError, IntegrationError
from integrations.sanitize import sanitize
from integrations.secretbox import SecretBox

from . import (
    config,
    deadletters,
    dispatch,
    endpoints_cli,
    grants,
    health,
    logs,
    messages,
    relay,
    retention,
    secrets,
    status,
    totals,
)
from .clock import iso, parse_since, utcnow
from .db import check_migrated, describe, make_engine, make_sessionmaker
from .enqueue import enqueue
from .errors import OutboxError
from .models import Message

log = logging.getLogger("outbox.cli")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line: ``outbox: error: … (outbox dead --help)``."""

    def error(self, message: str):
        self.exit(2, f"outbox: error: {message} (see {self.prog} --help)\n")


def _parse_since(text: str) -> datetime:
    """``30s``, ``30m``, ``2h``, ``7d`` (ago) or an ISO timestamp (UTC if no zone)."""
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--{exc}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a whole number from 1 to 1000000")
    return value


def _duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s`` or plain seconds (``outbox db prune``)."""
    try:
        return retention.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _batch_size(text: str) -> int:
    if not (text.strip().isdigit() and 1 <= int(text) <= retention.MAX_BATCH_SIZE):
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a whole number from 1 to "
                                         f"{retention.MAX_BATCH_SIZE}")
    return int(text)


def _port(text: str) -> int:
    if not (text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a TCP port (0-65535)")
    return int(text)


def _actor(args) -> str:
    return args.actor or os.environ.get("OUTBOX_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def _emit(args, data, lines) -> None:
    if getattr(args, "json", False):
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        for line in lines:
            print(line)


# ---- commands ---------------------------------------------------------------

def cmd_db_upgrade(args, sessions):
    from .migrations import upgrade

    upgrade(config.database_url())
    print(f"database at head: {_safe_url(config.database_url())}")


def cmd_db_prune(args, sessions):
    if not args.dry_run:   # count settled attempts into /metrics' totals before any goes
        totals.roll_up(sessions.kw["bind"])
    result = retention.prune(sessions.kw["bind"], delivered_older_than=args.delivered_older_than,
                             discarded_older_than=args.discarded_older_than,
                             batch_size=args.batch_size, dry_run=args.dry_run)
    lines = [result.summary(args.delivered_older_than, args.discarded_older_than),
             "dead letters and unfinished messages are never pruned"]
    if result.messages and not args.dry_run:
        took = retention.vacuum(sessions.kw["bind"])
        if took is not None:
            lines.append(f"vacuumed the outbox tables in {took:.1f} s")
    data = result.as_dict() | {
        "delivered_older_than_s": int(args.delivered_older_than.total_seconds()),
        "discarded_older_than_s": int(args.discarded_older_than.total_seconds())}
    _emit(args, data, lines)


def cmd_relay(args, sessions):
    from integrations.registry import supports_idempotency as idempotent
    from integrations.registry import verify_after

    engine = sessions.kw["bind"]   # the sessionmaker's engine
    settings = config.RelaySettings.from_env()
    from .retention import PruneSchedule  # its settings are checked at start too

    schedule = PruneSchedule.from_env()
    for provider in schemas.operations():   # refuse to start on a provider's bad settings
        config.retry_policy(provider)
        verify_after(provider)
    disp = dispatch.dispatcher()
    if disp.publisher is None:
        raise OutboxError("no publisher is installed (is the package installed with `pip install -e .`?)")
    if args.once:
        published = relay.run_once(engine, disp, settings, idempotent=idempotent,
                                   verify_after=verify_after)
        print(f"published {published}")
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _start_health_checks(stop)
    _start_oauth_keeper(stop)
    _start_alerts(sessions, stop)
    log.info("relay started on %s", _safe_url(config.database_url()))
    relay.run(engine, disp, settings, idempotent=idempotent, verify_after=verify_after,
              stop=stop, prune=schedule)


def cmd_status(args, sessions):
    from integrations.registry import provider_facts

    facts = provider_facts()
    with sessions() as session:
        data = status.report(session, facts=facts)
    data["protection"] = {name: fact["protection"] for name, fact in facts.items()}
    _emit(args, data, status.render(data, facts))
    return health.exit_code(data["level"])


def cmd_show(args, sessions):
    with sessions() as session:
        data = messages.detail(session, args.id)
        message = session.get(Message, args.id)
    marks = (", needs review" if message.needs_review else "") + (
        ", verifies before the next attempt" if message.verify_first else "")
    lines = [f"{message.label}  [{message.status}{marks}]",
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
    except RecursionError:
        raise OutboxError("--payload is nested too deeply") from None
    except ValueError:   # e.g. an integer of more than 4,300 digits
        raise OutboxError("--payload holds a number too large to read") from None
    with sessions() as session:
        message = enqueue(session, provider=args.provider, operation=args.operation,
                          payload=payload, idempotency_key=args.key,
                          correlation_id=args.correlation_id)
        session.commit()
        data = messages.as_dict(message)
    dispatch.dispatcher().flush()
    _emit(args, data, [f"{message.label} {message.status}"])


def _filters(args) -> deadletters.DeadFilter:
    return deadletters.DeadFilter(provider=args.provider, error_class=args.error_class,
                                  since=args.since, operation=args.operation, text=args.text)


def _has_filters(args) -> bool:
    return any((args.provider, args.error_class, args.since, args.operation, args.text,
                args.any_provider))


def cmd_dead_list(args, sessions):
    with sessions() as session:
        rows = deadletters.list_dead(session, _filters(args), limit=args.limit)
    data = [messages.as_dict(m) for m in rows]
    lines = [f"{iso(m.dead_at)}  {m.label}  {m.last_status_code or '---'} "
             f"{m.last_error_class}{' [needs review]' if m.needs_review else ''}: {m.last_error}"
             for m in rows]
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
    if args.ids and (args.all or _has_filters(args)):
        raise OutboxError("name message ids, or --all with filters; not both")
    if not args.ids and not args.all:
        raise OutboxError("name message ids, or --all with --provider P (or --any-provider)")
    with sessions() as session:
        results = deadletters.redrive(
            session, reason=args.reason, actor=_actor(args), ids=args.ids or None,
            where=_filters(args) if args.all else None, all_providers=args.any_provider,
            accept_duplicate_risk=args.accept_duplicate_risk, dry_run=args.dry_run)
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


def _start_health_checks(stop: threading.Event) -> None:
    """The providers' synthetic health checks, in a thread of the relay (see
    ``integrations.checks``)."""
    from integrations import checks
    from integrations.protection import store
    from integrations.registry import get_provider, known_providers

    interval = checks.interval_s()
    if interval is None:
        log.info("synthetic health checks are off (OUTBOX_CHECKS)")
        return
    runner = checks.CheckRunner(lambda: {n: get_provider(n) for n in known_providers()},
                                store.shared_redis(), interval)
    runner.start(stop)


def _start_oauth_keeper(stop: threading.Event) -> None:
    """OAuth2 grants refreshed when due even without traffic, and interrupted refreshes
    redeemed in time, in a thread of the relay (``integrations.oauth.keep_fresh``)."""
    from integrations.oauth import OAuthCredential, keep_fresh
    from integrations.registry import get_provider, known_providers

    def credentials():
        found = []
        for name in known_providers():
            try:
                credential = get_provider(name).client.credentials
            except (ConfigurationError, KeyError):
                continue   # bad settings: outbox status says which
            if isinstance(credential, OAuthCredential):
                found.append(credential)
        return found
    keep_fresh(credentials, stop)


def _start_alerts(sessions, stop: threading.Event) -> None:
    """``OUTBOX_ALERT_WEBHOOK_URL``: health evaluated every 30 s in a thread of the relay,
    one POST per change of level (see ``integrations.alerts``)."""
    from integrations import alerts
    from integrations.protection import store
    from integrations.registry import provider_facts

    target = alerts.webhook_client()
    if target is None:
        return
    notifier = alerts.AlertNotifier(*target, store.shared_redis())

    def loop():
        while not stop.wait(alerts.EVERY_S):
            try:
                with sessions() as session:
                    report = status.report(session, facts=provider_facts())
                notifier.notify(report)
            except Exception as exc:  # noqa: BLE001  (database or Redis away: next round)
                log.warning("health alert not evaluated (%s)", type(exc).__name__)

    threading.Thread(target=loop, name="outbox-alerts", daemon=True).start()


def cmd_web(args, sessions):
    import uvicorn

    from integrations.registry import provider_facts
    from web.admin import create_app, default_flower_url
    from web.auth import WebAuth

    app = create_app(sessions, WebAuth.from_env(), facts=provider_facts,
                     operations=schemas.operations(), flower_url=default_flower_url())
    log.info("admin app on http://%s:%d", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False,
                server_header=False)


def cmd_poll(args, sessions):
    """Poll the providers' event lists forever (``outbox.polling``)."""
    from integrations.protection import store
    from integrations.registry import get_provider, known_providers

    from .polling import Poller

    poller = Poller(sessions, {n: get_provider(n) for n in known_providers()},
                    store.shared_redis())
    if not poller.sources:
        raise OutboxError("no provider to poll (every one is OUTBOX_<NAME>_POLL=off, or has "
                          "no events list)")
    if args.once:
        print(json.dumps(poller.run_due()))
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("polling %s", ", ".join(poller.sources))
    poller.run(stop)


def cmd_crm_connect(args, sessions):
    """Authorise the crm provider: print the authorize URL, take the loopback callback,
    exchange the code (PKCE), store the tokens encrypted, resume waiting messages."""
    settings = crm.oauth_settings()
    SecretBox.from_env()   # no key (or a bad one): fail before the browser is involved
    store = grants.DatabaseGrants(sessions)
    try:
        listener = oauth.CallbackListener(settings.redirect_port)
    except OSError as exc:
        return _fail(f"cannot listen on {settings.redirect_uri} for the callback "
                     f"({exc.strerror}); set OUTBOX_CRM_REDIRECT_PORT")
    with listener:
        try:
            started = oauth.start_authorization(settings)
        except IntegrationError as exc:   # no client id, the client secret unreadable
            return _fail(f"crm connect: {exc.detail}")
        print("Open this URL in a browser and approve access (waiting for the redirect to "
              f"{settings.redirect_uri}):\n{started.url}", flush=True)
        try:
            callback = listener.wait(args.timeout)
        except TimeoutError as exc:
            return _fail(f"crm connect: {exc}: start again")
    try:
        tokens = oauth.finish_authorization(settings, started, callback, utcnow())
        store.connect("crm", tokens)
    except ValueError as exc:
        return _fail(f"crm connect: {exc}")
    except IntegrationError as exc:   # the client secret unreadable, the database down
        return _fail(f"crm connect: {exc.detail}")
    resumed = grants.resume(sessions, "crm")
    print(f"crm connected: access token valid for {tokens.lifetime_s:.0f} s, refreshed "
          f"ahead of expiry; {resumed} waiting message(s) resume now")
    return 0


def cmd_secrets_rotate(args, sessions):
    """Re-encrypt every stored secret under the first key of OUTBOX_SECRET_KEY."""
    counts = secrets.rotate(sessions, SecretBox.from_env())
    _emit(args, counts, [f"{table}: {n} secret(s) re-encrypted under the current key"
                         for table, n in counts.items()]
          + ["every stored secret is under the first key; older keys can now be dropped"])
    return 0


def cmd_inbound(args, sessions):
    """Serve the webhook receiver, or list/show inbound events."""
    if args.inbound_command == "list":
        return _inbound_list(args, sessions)
    if args.inbound_command == "show":
        return cmd_show(args, sessions)
    import uvicorn

    from web.inbound import max_body, sources_from_env

    sources = sources_from_env()   # checked here, so a bad setting is one line, exit 2
    max_body()
    if not sources:
        log.warning("no provider has a webhook secret (OUTBOX_<NAME>_WEBHOOK_SECRET): every "
                    "webhook will get 404")
    log.info("webhook receiver on http://%s:%d for %s (%d process(es))", args.host, args.port,
             ", ".join(sources) or "no provider", args.workers)
    uvicorn.run("web.inbound:receiver_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_config=None, access_log=False, server_header=False)


def _inbound_list(args, sessions):
    from .inbound import INBOUND, status_of, status_where

    with sessions() as session:
        query = select(Message).where(Message.provider == INBOUND)
        if args.provider:
            query = query.where(Message.operation.startswith(f"{args.provider}."))
        if args.status:   # in the query, so that --limit counts matching events
            query = query.where(status_where(args.status))
        rows = list(session.scalars(query.order_by(Message.created_at.desc(), Message.id)
                                    .limit(args.limit)))
    data = [messages.as_dict(m) | {"event_status": status_of(m),
                                   "event_id": m.payload.get("event_id"),
                                   "type": m.payload.get("type"),
                                   "source": m.payload.get("source")} for m in rows]
    lines = [f"{iso(m.created_at)}  {d['source']} {d['type']}  {d['event_id']}  "
             f"{d['event_status']}  {m.id}" for m, d in zip(rows, data, strict=True)]
    lines.append(f"{len(rows)} event(s)")
    _emit(args, data, lines)


def _safe_url(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


# ---- parser -----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="outbox", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="create or migrate the database").set_defaults(
        func=cmd_db_upgrade, opens_database=False)   # it creates the database
    p = db.add_parser("prune", help="delete delivered and discarded messages older than a "
                                    "window, with their attempts (dead letters are kept)")
    p.add_argument("--delivered-older-than", type=_duration, default="30d", metavar="AGE",
                   help="delivered messages older than this go (30d, 12h, 90m, 3600s; default 30d)")
    p.add_argument("--discarded-older-than", type=_duration, default="30d", metavar="AGE",
                   help="discarded messages older than this go (default 30d)")
    p.add_argument("--batch-size", type=_batch_size, default=retention.DEFAULT_BATCH_SIZE,
                   help="messages per transaction (default 500)")
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_db_prune)

    p = sub.add_parser("relay", help="publish due and lost messages, forever")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(func=cmd_relay)

    p = sub.add_parser("status", help="depths, ages, dead letters, health (exit 0/1/2)")
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
        p.add_argument("--operation")
        p.add_argument("--error-class")
        p.add_argument("--text", help="a message id, idempotency key or correlation id")
        p.add_argument("--since", type=_parse_since, help="30m, 2h, 7d or an ISO time")
        p.add_argument("--json", action="store_true")

    p = dead.add_parser("list", help="list dead letters")
    filters(p)
    p.add_argument("--limit", type=_positive_int, default=1000)
    p.set_defaults(func=cmd_dead_list, any_provider=False)

    p = dead.add_parser("redrive", help="send dead letters again")
    p.add_argument("ids", nargs="*")
    p.add_argument("--all", action="store_true", help="every dead letter matching the filters")
    filters(p)
    p.add_argument("--any-provider", action="store_true",
                   help="with --all and no --provider: act on every provider's dead letters")
    p.add_argument("--accept-duplicate-risk", action="store_true",
                   help="also re-drive 'needs review' messages, which the provider may already "
                        "have acted on and cannot deduplicate: they may be done twice")
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
    p.add_argument("--port", type=_port, default=os.environ.get("SANDBOX_PORT", "8100"),
                   help="0 picks a free one")
    p.set_defaults(func=cmd_sandbox, opens_database=False)
    p = sub.add_parser("poll", help="poll the providers' event lists (missed webhooks)")
    p.add_argument("--once", action="store_true", help="one cycle of every due provider")
    p.set_defaults(func=cmd_poll)

    p = sub.add_parser("inbound", help="the webhook receiver (POST /webhooks/{provider}); "
                                       "or list/show inbound events")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=os.environ.get("OUTBOX_INBOUND_PORT", "8200"))
    p.add_argument("--workers", type=_positive_int,
                   default=os.environ.get("OUTBOX_INBOUND_WORKERS", "1"),
                   help="server processes sharing the port (default 1; one per core under load)")
    p.set_defaults(func=cmd_inbound, inbound_command=None)
    events = p.add_subparsers(dest="inbound_command")
    q = events.add_parser("list", help="inbound events, newest first")
    q.add_argument("--provider")
    q.add_argument("--status", choices=["pending", "queued", "in_flight", "processed",
                                        "ignored", "dead", "discarded"])
    q.add_argument("--limit", type=_positive_int, default=100)
    q.add_argument("--json", action="store_true")
    q = events.add_parser("show", help="one event: its processing timeline and audit")
    q.add_argument("id")
    q.add_argument("--json", action="store_true")

    crm_ = sub.add_parser("crm", help="the crm provider (OAuth2)").add_subparsers(
        dest="crm_command", required=True)
    p = crm_.add_parser("connect", help="authorise access (OAuth2 code flow with PKCE); "
                                        "prints the URL to open")
    p.add_argument("--timeout", type=_positive_int, default=300,
                   help="seconds to wait for the browser's redirect (default 300)")
    p.set_defaults(func=cmd_crm_connect)

    keys = sub.add_parser("secrets", help="secrets stored encrypted").add_subparsers(
        dest="secrets_command", required=True)
    p = keys.add_parser("rotate", help="re-encrypt every stored secret under the first key of "
                                       "OUTBOX_SECRET_KEY (put the new key first, run this, "
                                       "drop the old)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_secrets_rotate)

    p = sub.add_parser("web", help="the admin app: dashboard, dead letters, API, /metrics, "
                                   "/health (needs OUTBOX_WEB_AUTH)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=os.environ.get("OUTBOX_WEB_PORT", "8300"))
    p.set_defaults(func=cmd_web)

    endpoints_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:   # --help, or a usage error already printed on one line
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        logs.configure()
    except ValueError as exc:   # OUTBOX_LOG_FORMAT or OUTBOX_LOG_LEVEL
        return _fail(str(exc))
    try:
        if not getattr(args, "opens_database", True):
            return args.func(args, None) or 0
        engine = make_engine()
        check_migrated(engine)
        return args.func(args, make_sessionmaker(engine)) or 0
    except (OutboxError, ConfigurationError) as exc:
        return _fail(str(exc))
    except sa_exc.OperationalError as exc:   # could not connect, or the server went away
        return _fail(f"database unreachable: {describe(exc)}")
    except sa_exc.DBAPIError as exc:
        return _fail(f"database error: {describe(exc)}")
    except BrokenPipeError:   # `outbox dead list --json | head`: the reader left, not an error
        sys.stderr.close()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:   # a bug: still one line, unless asked for the traceback
        if os.environ.get("OUTBOX_DEBUG"):
            traceback.print_exc()
        return _fail(f"internal error ({type(exc).__name__}); OUTBOX_DEBUG=1 shows the traceback")


def _fail(message: str) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"outbox: error: {sanitize(first)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
