"""OAuth2 grants in the outbox database (``integrations.oauth.GrantStore``), encrypted.

Tokens are Fernet-encrypted (``integrations.secretbox``, ``OUTBOX_SECRET_KEY``) before they
are written and decrypted when read; the table (``outbox_oauth_grants``) never holds one in
clear. Every write is one short transaction, and a refreshed pair is written only over the
version it was refreshed from: the old refresh token stays until the new one is committed.

Importing ``outbox`` installs this store (``install``). It opens its own engine on first
use (``DATABASE_URL``), forgotten in a forked child like the workers' own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime
from functools import cache

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from integrations import oauth, secretbox
from integrations.errors import CredentialUnavailable
from integrations.oauth import ACTIVE, REVOKED, Grant, Tokens
from integrations.secretbox import SecretBox

from .clock import utcnow
from .db import make_engine, make_sessionmaker
from .models import Message, MessageStatus, OAuthGrant

STORE_RETRY_S = 5.0


@contextmanager
def _reachable():
    """A database error is "cannot read the credential now": the message waits (deferred),
    it is not a failed attempt."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise CredentialUnavailable(f"OAuth grant store unavailable ({type(exc).__name__})",
                                    code="credential_unavailable",
                                    retry_after_s=STORE_RETRY_S) from exc


class DatabaseGrants:
    """``GrantStore`` on ``outbox_oauth_grants``."""

    def __init__(self, sessions: sessionmaker[Session],
                 keys: Callable[[], SecretBox] = secretbox.current):
        """Args:
            keys: the current keys, asked at every use: a worker started before a key
                rotation encrypts under the new first key as soon as it is configured.
        """
        self.sessions = sessions
        self._keys = keys

    @property
    def box(self) -> SecretBox:
        return self._keys()

    def load(self, provider: str) -> Grant | None:
        with _reachable(), self.sessions() as session:
            row = session.get(OAuthGrant, provider)
            if row is None:
                return None
            box = self.box
            tokens = Tokens(box.decrypt(row.access_token),
                            box.decrypt(row.refresh_token) if row.refresh_token else None,
                            row.expires_at, row.lifetime_s, row.scope)
            return Grant(tokens, row.status, row.status_detail, row.version,
                         row.refresh_started_at)

    def connect(self, provider: str, tokens: Tokens) -> None:
        now = utcnow()
        with _reachable(), self.sessions.begin() as session:
            row = session.get(OAuthGrant, provider, with_for_update=True)
            if row is None:
                row = OAuthGrant(provider=provider, version=0, connected_at=now)
                session.add(row)
            self._write(row, tokens)
            row.status, row.status_detail = ACTIVE, None
            row.version = (row.version or 0) + 1
            row.connected_at = row.updated_at = now

    def mark_refresh(self, provider: str, version: int, started_at: datetime) -> None:
        with _reachable(), self.sessions.begin() as session:
            session.execute(update(OAuthGrant)
                            .where(OAuthGrant.provider == provider,
                                   OAuthGrant.version == version)
                            .values(refresh_started_at=started_at))

    def save_refreshed(self, provider: str, version: int, tokens: Tokens) -> bool:
        box = self.box
        values = {"access_token": box.encrypt(tokens.access_token),
                  "refresh_token": (box.encrypt(tokens.refresh_token)
                                    if tokens.refresh_token else None),
                  "expires_at": tokens.expires_at, "lifetime_s": tokens.lifetime_s,
                  "scope": tokens.scope, "refresh_started_at": None,
                  "version": version + 1, "updated_at": utcnow()}
        with _reachable(), self.sessions.begin() as session:
            done = session.execute(update(OAuthGrant)
                                   .where(OAuthGrant.provider == provider,
                                          OAuthGrant.version == version,
                                          OAuthGrant.status == ACTIVE)
                                   .values(**values))
            return done.rowcount == 1

    def revoke(self, provider: str, version: int, detail: str) -> bool:
        with _reachable(), self.sessions.begin() as session:
            done = session.execute(update(OAuthGrant)
                                   .where(OAuthGrant.provider == provider,
                                          OAuthGrant.version == version)
                                   .values(status=REVOKED, status_detail=detail[:255],
                                           refresh_started_at=None,
                                           version=version + 1, updated_at=utcnow()))
            return done.rowcount == 1

    def _write(self, row: OAuthGrant, tokens: Tokens) -> None:
        box = self.box
        row.access_token = box.encrypt(tokens.access_token)
        row.refresh_token = box.encrypt(tokens.refresh_token) if tokens.refresh_token else None
        row.expires_at, row.lifetime_s, row.scope = tokens.expires_at, tokens.lifetime_s, tokens.scope
        row.refresh_started_at = None


def resume(sessions: sessionmaker[Session], provider: str) -> int:
    """Make ``provider``'s waiting messages due now (after it is connected again: they were
    deferred for re-authorisation). Returns how many."""
    now = utcnow()
    with sessions.begin() as session:
        done = session.execute(update(Message)
                               .where(Message.provider == provider,
                                      Message.status == MessageStatus.PENDING,
                                      Message.last_error_class == "deferred",
                                      Message.next_attempt_at > now)
                               .values(next_attempt_at=now))
        return done.rowcount


@cache
def _default_store() -> DatabaseGrants:
    return DatabaseGrants(make_sessionmaker(make_engine()))


def install() -> None:
    """Make this the store ``integrations.oauth`` uses in this process."""
    oauth.use_grant_store(_default_store)


os.register_at_fork(after_in_child=_default_store.cache_clear)
