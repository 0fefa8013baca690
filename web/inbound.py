"""The webhook receiver (``outbox inbound``): ``POST /webhooks/{provider}``.

It is the internet-facing process, so it does the least it can, in the seed's order:

1. refuse a body over the cap (``OUTBOX_INBOUND_MAX_BODY``, 1 MB) with 413 by its
   Content-Length, before reading or hashing it (and while reading one sent without);
2. verify the request in constant time (``integrations.signatures``; an optional IP
   allow-list first, never instead) — 400 if it is not provably the provider's;
3. store the raw body, the verified headers and the event id as a pending inbound event
   in one transaction (``outbox.inbound.store``: a duplicate event id stores nothing);
4. answer 200 (``{"received": true, "duplicate": …}``);
5. the relay publishes the event to the ``inbound`` queue on its next pass (the receiver
   holds no broker connection), where workers run its handler.

Per provider (``OUTBOX_<NAME>_…``): ``WEBHOOK_SECRET`` or ``WEBHOOK_SECRET_FILE`` (a
comma-separated list during a rotation: any verifies; a provider without one accepts no
webhooks: 404), ``WEBHOOK_SCHEME`` (``stripe``, the default for payments; ``standard``,
Standard Webhooks, the default for the others; or ``shared-header`` for providers that only
send a shared secret, in the header ``WEBHOOK_SECRET_HEADER``, default ``X-Webhook-Secret``),
and ``WEBHOOK_ALLOW_IPS`` (CIDRs; checked besides the signature).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from integrations import signatures
from integrations.errors import ConfigurationError
from integrations.registry import known_providers
from integrations.settings import secret_values
from outbox import inbound

from .admin import BodyLimit

log = logging.getLogger("outbox.inbound")

DEFAULT_MAX_BODY = 1024 * 1024
SCHEMES = ("stripe", "standard", "shared-header")
MAX_EVENT_ID = 200
MAX_EVENT_TYPE = 100


@dataclass(frozen=True)
class Source:
    """How one provider's webhooks are verified."""

    name: str
    scheme: str
    secrets: tuple[str, ...]
    secret_header: str = "x-webhook-secret"
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


def sources_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Source]:
    """Every provider with a webhook secret configured. Raises ConfigurationError."""
    env = os.environ if environ is None else environ
    found = {}
    for name in known_providers():
        prefix = f"OUTBOX_{name.upper()}_WEBHOOK_"
        secrets = tuple(secret_values(env, prefix + "SECRET", prefix + "SECRET_FILE"))
        if not secrets:
            continue
        scheme = env.get(prefix + "SCHEME", "").strip() or (
            "stripe" if name == "payments" else "standard")
        if scheme not in SCHEMES:
            raise ConfigurationError(f"{prefix}SCHEME={scheme[:30]!r}: one of "
                                     + ", ".join(SCHEMES))
        if scheme == "standard":
            for secret in secrets:
                try:
                    signatures.sign_standard(b"", secret, "check", 0)
                except ValueError as exc:
                    raise ConfigurationError(f"{prefix}SECRET: {exc}") from None
        try:
            allow = tuple(ipaddress.ip_network(c.strip(), strict=False) for c in
                          env.get(prefix + "ALLOW_IPS", "").split(",") if c.strip())
        except ValueError as exc:
            raise ConfigurationError(f"{prefix}ALLOW_IPS: {exc}") from None
        header = (env.get(prefix + "SECRET_HEADER", "").strip() or "X-Webhook-Secret").lower()
        found[name] = Source(name, scheme, secrets, header, allow)
    return found


def max_body(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    raw = env.get("OUTBOX_INBOUND_MAX_BODY", "").strip() or str(DEFAULT_MAX_BODY)
    if not (raw.isascii() and raw.isdigit()) or not 1024 <= int(raw) <= 64 * 1024 * 1024:
        raise ConfigurationError("OUTBOX_INBOUND_MAX_BODY: bytes, from 1024 to 67108864")
    return int(raw)


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_receiver(sessions: sessionmaker[Session], sources: Mapping[str, Source], *,
                    body_cap: int = DEFAULT_MAX_BODY,
                    clock: Callable[[], float] = time.time) -> FastAPI:
    """The receiver app; ``sources`` from ``sources_from_env``."""
    app = FastAPI(title="integration-outbox webhook receiver", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=body_cap)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/health/live")
    def live():
        return {"status": "ok"}

    @app.post("/webhooks/{provider}")
    async def receive(provider: str, request: Request):
        source = sources.get(provider)
        if source is None:
            raise Refused(404, "no webhooks are accepted for this provider")
        if source.allow and not _allowed(request, source):
            raise Refused(403, "this address may not send webhooks for this provider")
        body = await request.body()
        event_id, event_type, headers = verify(source, body, request.headers, clock())
        # The database work in a thread, not on the event loop.
        new = await run_in_threadpool(_store, provider, event_id, event_type, body, headers)
        return {"received": True, "duplicate": not new}   # the relay publishes it

    engine = sessions.kw["bind"]

    def _store(provider, event_id, event_type, body, headers) -> bool:
        try:
            with engine.begin() as connection:   # Core: a third of the ORM Session's cost
                _, new = inbound.store(connection, source=provider, event_id=event_id,
                                       event_type=event_type, body=body.decode(),
                                       headers=headers)
                return new
        except SQLAlchemyError as exc:
            log.warning("webhook %s not stored (%s)", provider, type(exc).__name__)
            raise Refused(503, "could not store the event; send it again") from None

    return app


def receiver_from_env() -> FastAPI:
    """The receiver as ``outbox inbound`` runs it, from the environment (a factory, so that
    each of uvicorn's worker processes builds its own engine and sources)."""
    from outbox.db import check_migrated, make_engine, make_sessionmaker

    # No pre-ping: a connection lost to a database restart fails one request with 503
    # (the provider sends it again) instead of every request paying a round trip.
    engine = make_engine(pool_pre_ping=False)
    check_migrated(engine)
    return create_receiver(make_sessionmaker(engine), sources_from_env(), body_cap=max_body())


def verify(source: Source, body: bytes, headers: Mapping[str, str],
           now: float) -> tuple[str, str, dict[str, str]]:
    """(event id, event type, verified headers) of a request, or Refused(400)."""
    try:
        if source.scheme == "stripe":
            verified = signatures.verify_stripe(body, headers.get("stripe-signature"),
                                                source.secrets, now)
        elif source.scheme == "standard":
            verified = signatures.verify_standard(body, headers, source.secrets, now)
        else:
            given = headers.get(source.secret_header, "")
            if not any(hmac.compare_digest(given.encode(), s.encode())
                       for s in source.secrets):
                raise signatures.SignatureError(f"missing or wrong {source.secret_header}")
            verified = signatures.Verified(None, int(now), {})
    except signatures.SignatureError as exc:
        raise Refused(400, f"signature: {exc}") from None
    document = _json_object(body)
    event_id = verified.event_id or document.get("id")
    event_type = document.get("type")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID:
        raise Refused(400, "the event has no id")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= MAX_EVENT_TYPE:
        raise Refused(400, "the event has no type")
    return event_id, event_type, verified.headers


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):   # UnicodeDecodeError is a ValueError
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(document, dict):
        raise Refused(400, "the body is not a JSON object")
    return document


def _allowed(request: Request, source: Source) -> bool:
    try:
        address = ipaddress.ip_address(request.client.host if request.client else "")
    except ValueError:
        return False
    return any(address in network for network in source.allow)
