"""The outbox's own view for operators: depths, ages, dead letters, error rates, and health.

``report`` gathers the figures from the database; the providers' live state (shared rate
limits and breakers in Redis, credentials, settings) is passed in by the caller, which
knows the providers (the core does not import them); ``outbox.health`` turns both into
levels and reasons.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import health
from .clock import utcnow
from .models import Attempt, AttemptOutcome, Message, MessageStatus

WAITING = (MessageStatus.PENDING, MessageStatus.QUEUED, MessageStatus.IN_FLIGHT)
FAILED = (AttemptOutcome.RETRY, AttemptOutcome.DEAD, AttemptOutcome.LOST)


def report(session: Session, now: datetime | None = None,
           thresholds: health.Thresholds = health.DEFAULT_THRESHOLDS,
           facts: Mapping[str, Mapping] | None = None,
           now_epoch_s: float | None = None) -> dict:
    """Per-provider counts by status, oldest due age, dead letters awaiting action, error
    rate, and health.

    Args:
        session: a session on the outbox database.
        now: the time of the report (naive UTC).
        thresholds: the health thresholds.
        facts: provider name → live state (see ``health.provider_findings``); None when
            the caller cannot know it (then health covers the database figures only).
        now_epoch_s: the current epoch time, to age open breakers (default: the clock).

    Returns:
        A JSON-ready dict: ``{"at", "providers": {name: {... "findings", "level"}},
        "findings": [global findings], "dead_awaiting", "level"}``.
    """
    now = now or utcnow()
    providers: dict[str, dict] = {}

    def entry(name: str) -> dict:
        return providers.setdefault(name, {
            "by_status": {s.value: 0 for s in MessageStatus}, "depth": 0,
            "retry_scheduled": 0, "oldest_due_age_s": 0.0, "dead_awaiting": 0,
            "dead_last_hour": 0, "attempts_5m": 0, "failures_5m": 0, "error_rate_5m": 0.0,
            "failures_by_code_5m": {}})

    for name in facts or ():
        entry(name)
    for provider, status, count in session.execute(
            select(Message.provider, Message.status, func.count()).group_by(
                Message.provider, Message.status)):
        e = entry(provider)
        e["by_status"][status] = count
        if status in WAITING:
            e["depth"] += count
        if status == MessageStatus.DEAD:
            e["dead_awaiting"] = count

    for provider, oldest in session.execute(
            select(Message.provider, func.min(Message.next_attempt_at))
            .where(Message.status.in_([MessageStatus.PENDING, MessageStatus.QUEUED]),
                   Message.next_attempt_at <= now).group_by(Message.provider)):
        entry(provider)["oldest_due_age_s"] = round((now - oldest).total_seconds(), 3)

    for provider, count in session.execute(
            select(Message.provider, func.count())
            .where(Message.status == MessageStatus.PENDING, Message.next_attempt_at > now)
            .group_by(Message.provider)):
        entry(provider)["retry_scheduled"] = count

    for provider, count in session.execute(
            select(Message.provider, func.count())
            .where(Message.dead_at >= now - timedelta(hours=1)).group_by(Message.provider)):
        entry(provider)["dead_last_hour"] = count

    for provider, outcome, code, error_class, count in session.execute(
            select(Message.provider, Attempt.outcome, Attempt.status_code, Attempt.error_class,
                   func.count())
            .join(Message, Message.id == Attempt.message_id)
            .where(Attempt.started_at >= now - timedelta(minutes=5),
                   Attempt.outcome != AttemptOutcome.DEFERRED)
            .group_by(Message.provider, Attempt.outcome, Attempt.status_code,
                      Attempt.error_class)):
        e = entry(provider)
        e["attempts_5m"] += count
        if outcome in FAILED:
            e["failures_5m"] += count
            key = str(code or error_class or outcome)
            e["failures_by_code_5m"][key] = e["failures_by_code_5m"].get(key, 0) + count

    epoch = time.time() if now_epoch_s is None else now_epoch_s
    for name, e in providers.items():
        if e["attempts_5m"]:
            e["error_rate_5m"] = round(e["failures_5m"] / e["attempts_5m"], 4)
        e["failures_by_code_5m"] = dict(sorted(e["failures_by_code_5m"].items(),
                                               key=lambda kv: -kv[1]))
        found = health.provider_findings(e, (facts or {}).get(name) if facts is not None
                                         else None, epoch, thresholds)
        e["findings"] = [f.to_dict() for f in found]
        e["checks"] = {f.check: f.level for f in found}
        e["level"] = health.worst(f.level for f in found)
    overall = health.redis_findings(facts) if facts else []
    return {
        "at": now.isoformat(timespec="seconds") + "Z",
        "providers": dict(sorted(providers.items())),
        "findings": [f.to_dict() for f in overall],
        "dead_awaiting": sum(e["dead_awaiting"] for e in providers.values()),
        "level": health.worst([*(e["level"] for e in providers.values()),
                               *(f.level for f in overall)]),
    }
