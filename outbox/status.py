"""The outbox's own view for operators: depths, ages, dead letters, error rates, and health.

``report`` gathers the figures from the database; the providers' live state (shared rate
limits and breakers in Redis, credentials, settings) is passed in by the caller, which
knows the providers (the core does not import them); ``outbox.health`` turns both into
levels and reasons.

What it costs follows what is live, not the table's history (issue 7 §3): each working
state (pending, queued, in flight) and the dead letters are counted through their partial
index (``ix_outbox_pending_due``, ``ix_outbox_queued``, ``ix_outbox_in_flight``,
``ix_outbox_dead``); recent activity (error rate, deliveries over 5 minutes, dead letters
of the last hour) through time ranges on indexed columns. History — delivered and
discarded rows, millions of them — is counted exactly up to ``EXACT_HISTORY_UP_TO`` per
provider and state; beyond that PostgreSQL's planner estimate is reported (its statistics,
kept by autovacuum), and the state is listed in ``by_status_estimated``. Counting a
million delivered rows exactly takes a scan of a million index entries on every ``outbox
status`` and every health probe, for a figure nobody acts on; what an operator acts on —
backlog, age, dead letters, errors, whether deliveries happen now (``delivered_5m``) —
stays exact. SQLite, the embedded single-machine database, counts history exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import func, literal_column, select, text
from sqlalchemy.orm import Session

from . import health, ordering
from .clock import utcnow
from .models import Attempt, AttemptOutcome, Message, MessageStatus

WAITING = (MessageStatus.PENDING, MessageStatus.QUEUED, MessageStatus.IN_FLIGHT)
HISTORY = (MessageStatus.DELIVERED, MessageStatus.DISCARDED)
FAILED = (AttemptOutcome.RETRY, AttemptOutcome.DEAD, AttemptOutcome.LOST)
# Per provider and history state: counted exactly up to this many rows, estimated beyond.
EXACT_HISTORY_UP_TO = 10_000


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
        "findings": [global findings], "dead_awaiting", "level"}``. A provider's
        ``by_status`` counts are exact except the states named in its
        ``by_status_estimated`` (delivered or discarded beyond ``EXACT_HISTORY_UP_TO``
        rows, on PostgreSQL).
    """
    now = now or utcnow()
    providers: dict[str, dict] = {}

    def entry(name: str) -> dict:
        return providers.setdefault(name, {
            "by_status": {s.value: 0 for s in MessageStatus}, "by_status_estimated": [],
            "depth": 0, "retry_scheduled": 0, "oldest_due_age_s": 0.0, "dead_awaiting": 0,
            "dead_last_hour": 0, "delivered_5m": 0, "attempts_5m": 0, "failures_5m": 0,
            "error_rate_5m": 0.0, "failures_by_code_5m": {}, "waiting_for_key": 0,
            "p50_ms_5m": None, "p95_ms_5m": None, "p99_ms_5m": None,
            "oldest_pending_due_age_s": 0.0})

    for name in facts or ():
        entry(name)
    oldest_due = _live_states(session, now, entry)
    # The last 5 minutes' attempts, through the index on started_at: what happens now.
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
        if outcome == AttemptOutcome.DELIVERED:
            e["delivered_5m"] += count
        if outcome in FAILED:
            e["failures_5m"] += count
            key = str(code or error_class or outcome)
            e["failures_by_code_5m"][key] = e["failures_by_code_5m"].get(key, 0) + count

    for provider, quantiles in _latency_5m(session, now).items():
        entry(provider).update(quantiles)

    # History: exact while small, estimated beyond (PostgreSQL); every provider with rows.
    for name in _providers_with_rows(session):
        entry(name)
    for (provider, state), (count, estimated) in _history_counts(session, providers).items():
        e = entry(provider)
        e["by_status"][state.value] = count
        if estimated:
            e["by_status_estimated"].append(state.value)

    epoch = time.time() if now_epoch_s is None else now_epoch_s
    for name, e in providers.items():
        e["depth"] = sum(e["by_status"][s] for s in WAITING)
        if name in oldest_due:
            e["oldest_due_age_s"] = round((now - oldest_due[name]).total_seconds(), 3)
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
        # Ordering keys held back by a dead-lettered head, until it is re-driven or discarded.
        "blocked_keys": [{"provider": p, "ordering_key": k, "waiting": n}
                         for p, k, n in ordering.blocked_keys(session)],
        "dead_awaiting": sum(e["dead_awaiting"] for e in providers.values()),
        "level": health.worst([*(e["level"] for e in providers.values()),
                               *(f.level for f in overall)]),
    }


QUANTILES = (("p50_ms_5m", 0.50), ("p95_ms_5m", 0.95), ("p99_ms_5m", 0.99))


def _latency_5m(session: Session, now: datetime) -> dict[str, dict[str, float]]:
    """Each provider's attempt durations over the last 5 minutes, as p50/p95/p99 in ms
    (calls made only: deferrals took no time at the provider)."""
    recent = [Attempt.started_at >= now - timedelta(minutes=5),
              Attempt.outcome != AttemptOutcome.DEFERRED]
    if session.get_bind().dialect.name == "postgresql":
        rows = session.execute(
            select(Message.provider,
                   *(func.percentile_cont(q).within_group(Attempt.duration_ms)
                     for _, q in QUANTILES))
            .join(Message, Message.id == Attempt.message_id).where(*recent)
            .group_by(Message.provider))
        return {p: {name: round(v, 1) for (name, _), v in zip(QUANTILES, values, strict=True)}
                for p, *values in rows}
    durations: dict[str, list[float]] = {}
    for provider, ms in session.execute(
            select(Message.provider, Attempt.duration_ms)
            .join(Message, Message.id == Attempt.message_id).where(*recent)):
        durations.setdefault(provider, []).append(ms)
    return {p: {name: round(_quantile(sorted(v), q), 1) for name, q in QUANTILES}
            for p, v in durations.items()}


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (PostgreSQL's ``percentile_cont``)."""
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _live_states(session: Session, now: datetime, entry) -> dict[str, datetime]:
    """Fill each provider's counts of the working states and dead letters, its retries
    scheduled and its dead letters of the last hour, each state from its own partial index
    (the status is in the SQL text, see ``_is``). Returns provider → oldest due time."""
    hour_ago = now - timedelta(hours=1)
    oldest_due: dict[str, datetime] = {}

    def due_since(provider: str, oldest: datetime | None) -> None:
        if oldest is not None and (provider not in oldest_due or oldest < oldest_due[provider]):
            oldest_due[provider] = oldest

    for provider, count, scheduled, parked, oldest in session.execute(
            select(Message.provider, func.count(),
                   func.count().filter(Message.next_attempt_at > now,
                                       Message.next_attempt_at < ordering.PARKED),
                   func.count().filter(Message.next_attempt_at == ordering.PARKED),
                   func.min(Message.next_attempt_at).filter(Message.next_attempt_at <= now))
            .where(_is(MessageStatus.PENDING)).group_by(Message.provider)):
        e = entry(provider)
        e["by_status"][MessageStatus.PENDING.value] = count
        e["retry_scheduled"] = scheduled
        e["waiting_for_key"] = parked
        if oldest is not None:   # due and not handed to the broker yet: the relay's lag
            e["oldest_pending_due_age_s"] = round((now - oldest).total_seconds(), 3)
        due_since(provider, oldest)
    for provider, count, oldest in session.execute(
            select(Message.provider, func.count(),
                   func.min(Message.next_attempt_at).filter(Message.next_attempt_at <= now))
            .where(_is(MessageStatus.QUEUED)).group_by(Message.provider)):
        entry(provider)["by_status"][MessageStatus.QUEUED.value] = count
        due_since(provider, oldest)
    for provider, count in session.execute(
            select(Message.provider, func.count())
            .where(_is(MessageStatus.IN_FLIGHT)).group_by(Message.provider)):
        entry(provider)["by_status"][MessageStatus.IN_FLIGHT.value] = count
    for provider, count, recent in session.execute(
            select(Message.provider, func.count(),
                   func.count().filter(Message.dead_at >= hour_ago))
            .where(_is(MessageStatus.DEAD)).group_by(Message.provider)):
        e = entry(provider)
        e["by_status"][MessageStatus.DEAD.value] = e["dead_awaiting"] = count
        e["dead_last_hour"] += recent
    # Dead-lettered in the last hour and discarded since (discarding stamps updated_at).
    for provider, recent in session.execute(
            select(Message.provider, func.count())
            .where(_is(MessageStatus.DISCARDED), Message.updated_at >= hour_ago,
                   Message.dead_at >= hour_ago).group_by(Message.provider)):
        entry(provider)["dead_last_hour"] += recent

    return oldest_due


def _is(state: MessageStatus):
    """``status = '<state>'`` with the value written into the SQL, not bound as a parameter:
    so the planner always sees which partial index covers the rows, also in a prepared
    statement's generic plan (psycopg prepares a query it has run five times)."""
    return Message.status == literal_column(f"'{state.value}'")


# Every provider that has rows, one index probe each (a loose index scan over the
# (provider, …) index): a provider left with only history still gets its line.
_PROVIDERS = text("""
WITH RECURSIVE p(provider) AS (
    SELECT min(provider) FROM outbox_messages
    UNION ALL
    SELECT (SELECT min(m.provider) FROM outbox_messages m WHERE m.provider > p.provider)
    FROM p WHERE p.provider IS NOT NULL)
SELECT provider FROM p WHERE provider IS NOT NULL""")


def _providers_with_rows(session: Session) -> list[str]:
    return list(session.execute(_PROVIDERS).scalars())


def _history_counts(session: Session, providers: Iterable[str]
                    ) -> dict[tuple[str, MessageStatus], tuple[int, bool]]:
    """(provider, delivered|discarded) → (count, whether it is an estimate).

    PostgreSQL: the planner's estimate first (no rows read); a small one is replaced by an
    exact count that reads at most ``EXACT_HISTORY_UP_TO`` + 1 index entries, so stale
    statistics cannot make this slow either. SQLite: exact counts.
    """
    if session.get_bind().dialect.name != "postgresql":
        return {(provider, MessageStatus(state)): (count, False)
                for provider, state, count in session.execute(
                    select(Message.provider, Message.status, func.count())
                    .where(Message.status.in_(HISTORY))
                    .group_by(Message.provider, Message.status))}
    return {(provider, state): _history_count(session, state, provider)
            for provider in providers for state in HISTORY}


def _history_count(session: Session, state: MessageStatus, provider: str,
                   operation: str | None = None) -> tuple[int, bool]:
    """PostgreSQL: (count, whether it is an estimate) of one history state, see
    ``_history_counts``."""
    estimate = _planner_rows(session, provider, state, operation)
    if estimate > EXACT_HISTORY_UP_TO:
        return estimate, True
    where = [Message.provider == provider, _is(state)]
    if operation is not None:
        where.append(Message.operation == operation)
    capped = select(literal_column("1")).where(*where).limit(EXACT_HISTORY_UP_TO + 1)
    count = session.execute(select(func.count()).select_from(capped.subquery())).scalar()
    return (count, False) if count <= EXACT_HISTORY_UP_TO else (max(count, estimate), True)


def _planner_rows(session: Session, provider: str, state: MessageStatus,
                  operation: str | None = None) -> int:
    """PostgreSQL's estimate of the rows of ``provider`` (and ``operation``) in ``state``
    (EXPLAIN: statistics only, nothing read)."""
    also = " AND operation = :operation" if operation is not None else ""
    plan = session.execute(text(
        "EXPLAIN (FORMAT JSON) SELECT 1 FROM outbox_messages "
        f"WHERE provider = :provider AND status = '{state.value}'{also}"),
        {"provider": provider, "operation": operation}).scalar()
    if isinstance(plan, str):   # a driver that does not decode json
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def message_counts(session: Session, operations: Mapping[str, Iterable[str]]
                   ) -> dict[tuple[str, str, str], tuple[int, bool]]:
    """(provider, operation, status) → (count, whether it is an estimate), for ``/metrics``.

    The working states and dead letters are counted exactly through their partial
    indexes; delivered and discarded as in ``report`` (exact up to ``EXACT_HISTORY_UP_TO``,
    then PostgreSQL's estimate), for each of ``operations`` (provider → its operations).
    """
    counts: dict[tuple[str, str, str], tuple[int, bool]] = {}
    for state in (*WAITING, MessageStatus.DEAD):
        for provider, operation, count in session.execute(
                select(Message.provider, Message.operation, func.count())
                .where(_is(state)).group_by(Message.provider, Message.operation)):
            counts[provider, operation, state.value] = (count, False)
    if session.get_bind().dialect.name != "postgresql":
        for provider, operation, state, count in session.execute(
                select(Message.provider, Message.operation, Message.status, func.count())
                .where(Message.status.in_(HISTORY))
                .group_by(Message.provider, Message.operation, Message.status)):
            counts[provider, operation, state] = (count, False)
        return counts
    for provider, names in operations.items():
        for operation in sorted(names):
            for state in HISTORY:
                counts[provider, operation, state.value] = _history_count(
                    session, state, provider, operation)
    return counts


def count_text(count: int, estimated: bool = False) -> str:
    """A count for people: ``1234``, or an estimate rounded, ``~1.2M``, ``~48k``."""
    if not estimated:
        return str(count)
    if count >= 999_500:
        return f"~{count / 1_000_000:.1f}M"
    if count >= 1000:
        return f"~{count / 1000:.0f}k"
    return f"~{count}"


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
        rough = set(e.get("by_status_estimated", ()))
        delivered, discarded = (count_text(s[k], k in rough) for k in ("delivered", "discarded"))
        lines.append(f"{name:<12}{s['pending'] - e['retry_scheduled']:>8}{s['queued']:>8}"
                     f"{s['in_flight']:>8}{e['retry_scheduled']:>8}{delivered:>9}"
                     f"{s['dead']:>6}{discarded:>6}{e['oldest_due_age_s']:>11.1f}s"
                     f"{e['error_rate_5m'] * 100:>7.1f}%  {e['level']}")
        lines += [f"  {f['level'].upper()}: {f['reason']}" for f in e["findings"]]
    for b in data.get("blocked_keys", ()):
        lines.append(f"blocked: {b['provider']} ordering key {b['ordering_key']!r}: "
                     f"{b['waiting']} message(s) wait behind a dead letter "
                     "(re-drive or discard it)")
    lines.append("protection (shared by every worker):")
    lines += ["  " + protection_line(name, fact) for name, fact in facts.items()]
    return lines


def protection_line(name: str, fact: dict) -> str:
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
