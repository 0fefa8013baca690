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
        found = health.provider_findings(e, None if facts is None else facts.get(name),
                                         epoch, thresholds)
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


def render(data: dict, facts: Mapping[str, Mapping]) -> list[str]:
    """``report``'s dict as the lines ``outbox status`` prints: level and findings, one row
    per provider, then each provider's shared protection state from ``facts``."""
    lines = [f"outbox status: {data['level']}   dead letters awaiting action: "
             f"{data['dead_awaiting']}"]
    lines += [f"  {f['level'].upper()}: {f['reason']}" for f in data["findings"]]
    lines.append(f"{'provider':<12}{'pending':>8}{'queued':>8}{'flight':>8}{'retry@':>8}"
                 f"{'deliv.':>9}{'dead':>6}{'disc.':>6}{'oldest due':>12}{'err 5m':>8}  level")
    for name, e in data["providers"].items():
        s = e["by_status"]
        lines.append(f"{name:<12}{s['pending'] - e['retry_scheduled']:>8}{s['queued']:>8}"
                     f"{s['in_flight']:>8}{e['retry_scheduled']:>8}{s['delivered']:>9}"
                     f"{s['dead']:>6}{s['discarded']:>6}{e['oldest_due_age_s']:>11.1f}s"
                     f"{e['error_rate_5m'] * 100:>7.1f}%  {e['level']}")
        lines += [f"  {f['level'].upper()}: {f['reason']}" for f in e["findings"]]
    lines.append("protection (shared by every worker):")
    lines += ["  " + _protection_line(name, fact) for name, fact in facts.items()]
    return lines


def _protection_line(name: str, fact: dict) -> str:
    p = fact.get("protection")
    if p is None:
        return f"{name:<12}protection unavailable: {fact.get('settings_error')}"
    if "error" in p and "breaker" not in p:
        return f"{name:<12}protection unknown: {p['error']}"
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
    return f"{name:<12}" + "   ".join(parts)
