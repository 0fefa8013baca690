"""The outbox tables: messages (the source of truth), their attempts, and the audit trail;
and the state some providers keep (OAuth grants, webhook endpoints).

Lifecycle of ``Message.status``::

    pending ─► queued ─► in_flight ─► delivered
       ▲          │          │
       └──────────┴──────────┤ retry / deferral (next_attempt_at in the database)
                             ▼
                            dead ─► pending (re-drive) | discarded
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class MessageStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    DEAD = "dead"
    DISCARDED = "discarded"


class AttemptOutcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"          # failed, another attempt is scheduled
    DEFERRED = "deferred"    # not attempted (breaker, limiter, quota): no attempt consumed
    DEAD = "dead"            # failed, dead-lettered
    LOST = "lost"            # the worker's lease expired before it reported an outcome


class Base(DeclarativeBase):
    pass


def _where(condition: str) -> dict[str, Any]:
    """A partial index's condition, for both databases."""
    return {"postgresql_where": text(condition), "sqlite_where": text(condition)}


class Message(Base):
    """One integration operation, from ``enqueue`` to delivery or dead letter."""

    __tablename__ = "outbox_messages"

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    provider: Mapped[str] = mapped_column(String(64))
    operation: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    payload_sha256: Mapped[str] = mapped_column(String(64))
    correlation_id: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.PENDING)
    # Attempts consumed against the retry budget; free 429s and deferrals do not count.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    rate_limited_count: Mapped[int] = mapped_column(Integer, default=0)
    # Fencing token: bumped by every claim; an outcome is recorded only under the token it claimed.
    lease_token: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    dead_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Start of the current retry budget (max age): enqueue time, or the last re-drive.
    budget_started_at: Mapped[datetime] = mapped_column(DateTime)
    last_error_class: Mapped[str | None] = mapped_column(String(32))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    provider_ref: Mapped[str | None] = mapped_column(String(255))
    # Dead-lettered because the provider may have acted and cannot deduplicate a retry:
    # a re-drive may act twice, so it needs an operator's explicit consent.
    needs_review: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The last attempt's outcome is unknown and the provider can look it up: the next
    # attempt asks it first (``outbox.decisions``, rule 1) and sends only if it was not done.
    verify_first: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Which key the provider sees (``lifecycle.Claim.provider_key``): 0 is the message's own;
    # after a spent key (a stored error it would replay) was verified not done, the next.
    key_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Ordered delivery (optional): rows with the same (provider, ordering_key) are delivered
    # one at a time in ordering_seq order, which is their commit order (``outbox.ordering``).
    ordering_key: Mapped[str | None] = mapped_column(String(255))
    ordering_seq: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        UniqueConstraint("provider", "idempotency_key", name="uq_outbox_messages_provider_key"),
        # With the operation last, /metrics counts each operation's history through it.
        Index("ix_outbox_messages_provider_status_op", "provider", "status", "operation"),
        # Partial indexes: each covers only the rows in one working state, so the relay's,
        # the lease recovery's and the status queries cost what is live, not what is history.
        *(Index(name, *columns, **_where(condition)) for name, columns, condition in (
            ("ix_outbox_pending_due", ("provider", "next_attempt_at", "id"),
             "status = 'pending'"),
            ("ix_outbox_queued", ("provider", "queued_at", "id"), "status = 'queued'"),
            ("ix_outbox_in_flight", ("lease_expires_at",), "status = 'in_flight'"),
            ("ix_outbox_dead", ("provider", "dead_at"), "status = 'dead'"),
            ("ix_outbox_delivered_at", ("delivered_at",), "status = 'delivered'"),
            ("ix_outbox_discarded_at", ("updated_at",), "status = 'discarded'"),
        )),
        Index("uq_outbox_ordering", "provider", "ordering_key", "ordering_seq", unique=True,
              **_where("ordering_key IS NOT NULL")),
    )

    @property
    def label(self) -> str:
        """Readable, payload-free label: ``payments.charge 01J…``."""
        return f"{self.provider}.{self.operation} {self.id}"


class Attempt(Base):
    """One delivery attempt (or deferral, or lost lease) of a message: the timeline of ``outbox show``."""

    __tablename__ = "outbox_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("outbox_messages.id"), index=True)
    lease_token: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    duration_ms: Mapped[float] = mapped_column(Float, default=0.0)
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer)
    error_class: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)   # sanitised, never a payload
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    worker: Mapped[str | None] = mapped_column(String(255))


class AuditEntry(Base):
    """Who did what to a message by hand, and why (re-drive, discard)."""

    __tablename__ = "outbox_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(32))
    message_id: Mapped[str | None] = mapped_column(ForeignKey("outbox_messages.id"), index=True)
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class AttemptTotal(Base):
    """Attempts counted once and for all (``outbox.totals``): the counters behind
    ``/metrics``, which stay monotonic when retention deletes the attempts themselves.

    One row per provider, operation, outcome, error class ('' for none), status code (0 for
    none) and duration bucket (index into ``outbox.totals.BUCKETS_S``)."""

    __tablename__ = "outbox_attempt_totals"

    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    operation: Mapped[str] = mapped_column(String(64), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)
    error_class: Mapped[str] = mapped_column(String(32), primary_key=True)
    status_code: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    count: Mapped[int] = mapped_column(BigInteger)
    duration_s_sum: Mapped[float] = mapped_column(Float)


class Rollup(Base):
    """How far ``outbox.totals`` has counted: attempts with ``id <= last_id`` are in
    ``outbox_attempt_totals``; ``candidate_id`` is the highest id seen at ``candidate_at``,
    counted at the next roll-up at least a minute later (see ``outbox.totals``)."""

    __tablename__ = "outbox_rollups"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)
    candidate_id: Mapped[int] = mapped_column(BigInteger)
    candidate_at: Mapped[datetime] = mapped_column(DateTime)



class PollCursor(Base):
    """Where a provider's poller is (``outbox.polling``): the last event stored, and when to
    poll next (the interval grows while nothing changes)."""

    __tablename__ = "outbox_poll_cursors"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    cursor: Mapped[str | None] = mapped_column(String(255))
    interval_s: Mapped[float] = mapped_column(Float)
    next_poll_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class OAuthGrant(Base):
    """A provider's OAuth2 grant (``integrations.oauth``): its tokens, Fernet-encrypted
    (``integrations.secretbox``; never in clear, never logged), when the access token
    expires, and whether the grant still works.

    ``version`` grows with every save: a refreshed pair is written only over the version it
    was refreshed from (the old refresh token stays until the new one is committed).
    ``refresh_started_at`` is set while a refresh is in flight: still set later, the worker
    that sent it died before saving, and the next refresh redeems the same refresh token
    again within the server's grace window (see ``integrations.oauth``)."""

    __tablename__ = "outbox_oauth_grants"

    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    access_token: Mapped[str] = mapped_column(Text)
    refresh_token: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    lifetime_s: Mapped[float] = mapped_column(Float)
    scope: Mapped[str | None] = mapped_column(String(1000))
    status: Mapped[str] = mapped_column(String(16))          # active | revoked
    status_detail: Mapped[str | None] = mapped_column(String(255))
    version: Mapped[int] = mapped_column(Integer)
    refresh_started_at: Mapped[datetime | None] = mapped_column(DateTime)
    connected_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class WebhookEndpoint(Base):
    """A subscriber endpoint of the ``webhooks`` provider (``outbox.endpoints``).

    ``secret`` and ``previous_secret`` are Fernet tokens (``integrations.secretbox``), never
    the ``whsec_`` secret in clear. While ``previous_secret_expires_at`` is in the future
    deliveries are signed under both (a rotation). ``event_types`` is a list of event
    types, ``*`` for every one."""

    __tablename__ = "outbox_webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list] = mapped_column(JSON)
    rate_limit: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))          # enabled | disabled
    disabled_reason: Mapped[str | None] = mapped_column(String(255))
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime)
    secret: Mapped[str] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
