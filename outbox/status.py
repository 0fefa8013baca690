"""The outbox's own view for operators: depths, ages, dead letters, error rate, health level."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .clock import utcnow
from .models import Attempt, AttemptOutcome, Message, MessageStatus

WAITING = (MessageStatus.PENDING, MessageStatus.QUEUED, MessageStatus.IN_FLIGHT)


@dataclass(frozen=True)
class Thresholds:
    """Warning/critical levels from the seed (queue depth 100/1000, dead letters any/10 per hour,
    error rate 1 %/5 % over five minutes)."""

    depth: tuple[int, int] = (100, 1000)
    dead_per_hour: tuple[int, int] = (1, 10)
    error_rate: tuple[float, float] = (0.01, 0.05)


def _level(value: float, levels: tuple[float, float]) -> str:
    return "critical" if value >= levels[1] else "warning" if value >= levels[0] else "ok"


def report(session: Session, now: datetime | None = None,
           thresholds: Thresholds = Thresholds()) -> dict:
    """Per-provider counts by status, oldest due age, dead letters awaiting action, and health.

    Returns a JSON-ready dict: ``{"providers": {name: {...}}, "dead_awaiting": n, "level": ...}``.
    """
    now = now or utcnow()
    providers: dict[str, dict] = {}

    def entry(name: str) -> dict:
        return providers.setdefault(name, {
            "by_status": {s.value: 0 for s in MessageStatus}, "depth": 0,
            "retry_scheduled": 0, "oldest_due_age_s": 0.0, "dead_awaiting": 0,
            "dead_last_hour": 0, "attempts_5m": 0, "failures_5m": 0, "error_rate_5m": 0.0})

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

    failed = (AttemptOutcome.RETRY, AttemptOutcome.DEAD, AttemptOutcome.LOST)
    for provider, outcome, count in session.execute(
            select(Message.provider, Attempt.outcome, func.count())
            .join(Message, Message.id == Attempt.message_id)
            .where(Attempt.started_at >= now - timedelta(minutes=5),
                   Attempt.outcome != AttemptOutcome.DEFERRED)
            .group_by(Message.provider, Attempt.outcome)):
        e = entry(provider)
        e["attempts_5m"] += count
        if outcome in failed:
            e["failures_5m"] += count

    levels = []
    for e in providers.values():
        if e["attempts_5m"]:
            e["error_rate_5m"] = round(e["failures_5m"] / e["attempts_5m"], 4)
        e["checks"] = {
            "depth": _level(e["depth"], thresholds.depth),
            "dead_letters": _level(e["dead_last_hour"], thresholds.dead_per_hour),
            "error_rate": _level(e["error_rate_5m"], thresholds.error_rate),
        }
        e["level"] = _worst(e["checks"].values())
        levels.append(e["level"])
    return {
        "at": now.isoformat(timespec="seconds") + "Z",
        "providers": dict(sorted(providers.items())),
        "dead_awaiting": sum(e["dead_awaiting"] for e in providers.values()),
        "level": _worst(levels),
    }


def _worst(levels) -> str:
    order = {"ok": 0, "warning": 1, "critical": 2}
    return max(levels, key=order.__getitem__, default="ok")
