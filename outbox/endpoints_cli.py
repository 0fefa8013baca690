"""``outbox endpoints``: the webhooks provider's subscriber endpoints (``outbox.endpoints``).

    outbox endpoints add URL --events E,… [--rate-limit 10/s] [--json]
    outbox endpoints list [--json]
    outbox endpoints disable ID [--reason TEXT] [--json]
    outbox endpoints enable ID [--json]
    outbox endpoints rotate-secret ID [--json]

``add`` and ``rotate-secret`` print the ``whsec_`` signing secret, once: it is stored
encrypted and never shown again (nor by ``list``). Bad input is one line, exit 2.
"""

from __future__ import annotations

import argparse

from integrations.secretbox import SecretBox
from integrations.webhooks.endpoints import allow_hosts

from . import endpoints
from .clock import iso


def register(sub) -> None:
    """Add the ``endpoints`` commands to the ``outbox`` parser's subcommands ``sub``."""
    group = sub.add_parser("endpoints", help="webhook endpoints (signed outbound webhooks)")
    commands = group.add_subparsers(dest="endpoints_command", required=True)

    p = commands.add_parser("add", help="register an endpoint; prints its signing secret once")
    p.add_argument("url", help="https:// URL (http:// only for OUTBOX_WEBHOOKS_ALLOW_HOSTS)")
    p.add_argument("--events", required=True, help="event types, comma-separated; '*' = all")
    p.add_argument("--rate-limit", help="the endpoint's own limit, e.g. 10/s, 600/m")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_add)

    p = commands.add_parser("list", help="every endpoint (never a secret)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("disable", help="stop delivering: its messages dead-letter "
                                            "endpoint_disabled")
    p.add_argument("id")
    p.add_argument("--reason", default="disabled by hand")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_disable)

    p = commands.add_parser("enable", help="deliver again (then re-drive its dead letters)")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_enable)

    p = commands.add_parser("rotate-secret", help="new signing secret, printed once; the old "
                                                  "one keeps signing for 24 h")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rotate_secret)


def _emit(args, data, lines) -> None:
    from .cli import _emit as emit  # the CLI's one output rule (--json or lines)

    emit(args, data, lines)


def cmd_add(args: argparse.Namespace, sessions) -> None:
    box = SecretBox.from_env()   # before anything: without a key nothing can be stored
    with sessions.begin() as session:
        endpoint, secret = endpoints.add(session, args.url, args.events.split(","), box=box,
                                         rate_limit=args.rate_limit,
                                         allow_hosts=allow_hosts())
        data = endpoints.as_dict(endpoint) | {"secret": secret}
    _emit(args, data, [f"{data['id']} {data['url']} events {','.join(data['events'])}"
                       + (f" rate limit {data['rate_limit']}" if data["rate_limit"] else ""),
                       f"signing secret (shown once, store it now): {secret}"])


def cmd_list(args: argparse.Namespace, sessions) -> None:
    with sessions() as session:
        data = [endpoints.as_dict(e) for e in endpoints.all_endpoints(session)]
    lines = [f"{d['id']}  {d['status']:<8}  {d['url']}  events {','.join(d['events'])}"
             + (f"  rate {d['rate_limit']}" if d["rate_limit"] else "")
             + (f"  ({d['disabled_reason']})" if d["disabled_reason"] else "")
             + (f"  previous secret until {d['previous_secret_expires_at']}"
                if d["previous_secret_expires_at"] else "") for d in data]
    lines.append(f"{len(data)} endpoint(s)")
    _emit(args, data, lines)


def cmd_disable(args: argparse.Namespace, sessions) -> None:
    with sessions.begin() as session:
        data = endpoints.as_dict(endpoints.disable(session, args.id, args.reason))
    _emit(args, data, [f"{data['id']} disabled ({data['disabled_reason']})"])


def cmd_enable(args: argparse.Namespace, sessions) -> None:
    with sessions.begin() as session:
        data = endpoints.as_dict(endpoints.enable(session, args.id))
    _emit(args, data, [f"{data['id']} enabled; its dead letters can be re-driven "
                       "(outbox dead list --provider webhooks)"])


def cmd_rotate_secret(args: argparse.Namespace, sessions) -> None:
    box = SecretBox.from_env()
    with sessions.begin() as session:
        secret = endpoints.rotate_secret(session, args.id, box=box)
        endpoint = endpoints.get(session, args.id)
        data = endpoints.as_dict(endpoint) | {"secret": secret}
    _emit(args, data, [f"{data['id']} new signing secret (shown once, store it now): {secret}",
                       f"the previous secret also signs until "
                       f"{iso(endpoint.previous_secret_expires_at)}"])
