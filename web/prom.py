"""``/metrics``: the outbox's figures in Prometheus' text format, through
``prometheus_client``.

Every figure is cluster-wide: read at scrape time from the database (``outbox.status``,
``outbox.totals``) and from the providers' shared state in Redis, never from this
process's memory, so any web process answers the same. Counts only: no payload, key,
id or customer datum is ever a label.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from outbox import health, status, totals
from outbox.clock import utcnow

CONTENT_TYPE = CONTENT_TYPE_LATEST
BREAKER_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}
LEVELS = {health.OK: 0, health.WARNING: 1, health.CRITICAL: 2}


class OutboxCollector(Collector):
    """Collects on every scrape (``facts`` gives the providers' live state)."""

    def __init__(self, sessions: sessionmaker[Session], facts: Callable[[], Mapping[str, dict]],
                 operations: Mapping[str, Iterable[str]],
                 clock: Callable[[], datetime] = utcnow):
        self._sessions = sessions
        self._clock = clock
        self._facts = facts
        self._operations = operations

    def collect(self) -> Iterable[Metric]:
        facts = self._facts()
        with self._sessions() as session:
            report = status.report(session, now=self._clock(), facts=facts)
            counts = status.message_counts(session, self._operations)
        attempts = totals.read(self._sessions.kw["bind"])
        yield from _messages(counts)
        yield from _providers(report, facts)
        yield from _attempts(attempts)


def registry(collector: OutboxCollector) -> CollectorRegistry:
    """A registry of the outbox's figures only (no per-process metrics: they would differ
    from one web process to the next)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)


def _messages(counts) -> Iterable[Metric]:
    messages = GaugeMetricFamily(
        "outbox_messages", "Outbox messages by provider, operation and status (delivered and "
        "discarded beyond 10,000 are PostgreSQL's estimate).",
        labels=["provider", "operation", "status"])
    for (provider, operation, state), (count, _estimated) in sorted(counts.items()):
        messages.add_metric([provider, operation, state], count)
    yield messages


# The per-provider gauges: key → (family, help). ``outbox_check_up`` also has a reason.
PROVIDER_GAUGES = {
    "oldest": ("outbox_oldest_due_age_seconds",
               "Age of the oldest message due and not yet delivered."),
    "lag": ("outbox_relay_lag_seconds",
            "Age of the oldest due message not yet handed to the broker."),
    "dead": ("outbox_dead_letters", "Dead letters awaiting action."),
    "dead_hour": ("outbox_dead_letters_last_hour", "Messages dead-lettered in the last hour."),
    "level": ("outbox_health_level", "Health level: 0 ok, 1 warning, 2 critical."),
    "breaker": ("outbox_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open."),
    "pause": ("outbox_pause_remaining_seconds",
              "Time left of a pause ordered by the provider (429)."),
    "in_use": ("outbox_concurrency_in_use",
               "Calls in flight to the provider, across all workers."),
    "quota_used": ("outbox_quota_used", "Daily quota used."),
    "quota_limit": ("outbox_quota_limit", "Daily quota."),
    "rate_limit": ("outbox_rate_limit_per_second",
                   "The provider's global rate limit (calls per second)."),
    "baseline": ("outbox_latency_baseline_seconds", "The p99 latency baseline health compares "
                 "with (OUTBOX_<NAME>_LATENCY_BASELINE_MS)."),
    "check_up": ("outbox_check_up", "The last synthetic health check passed (1) or not (0)."),
    "check_s": ("outbox_check_duration_seconds",
                "How long the last synthetic health check took."),
    "check_at": ("outbox_check_timestamp_seconds",
                 "When the last synthetic health check ran (epoch)."),
    "redis": ("outbox_protection_state_known",
              "1 when the shared limiter/breaker state could be read from Redis."),
}


def _providers(report: dict, facts: Mapping[str, dict]) -> Iterable[Metric]:
    fams = {key: GaugeMetricFamily(name, text, labels=["provider", "reason"]
                                   if key == "check_up" else ["provider"])
            for key, (name, text) in PROVIDER_GAUGES.items()}
    for name, e in report["providers"].items():
        fams["oldest"].add_metric([name], e["oldest_due_age_s"])
        fams["lag"].add_metric([name], e["oldest_pending_due_age_s"])
        fams["dead"].add_metric([name], e["dead_awaiting"])
        fams["dead_hour"].add_metric([name], e["dead_last_hour"])
        fams["level"].add_metric([name], LEVELS[e["level"]])
    for name, fact in sorted(facts.items()):
        if fact.get("latency_baseline_ms"):
            fams["baseline"].add_metric([name], fact["latency_baseline_ms"] / 1000)
        check = fact.get("check")
        if check is not None:
            fams["check_up"].add_metric([name, "ok" if check["ok"] else check["reason"]],
                                        1 if check["ok"] else 0)
            fams["check_s"].add_metric([name], check["duration_ms"] / 1000)
            fams["check_at"].add_metric([name], check["at"])
        p = fact.get("protection") or {}
        fams["redis"].add_metric([name], 0 if p.get("error") or not p else 1)
        breaker = p.get("breaker") or {}
        if "state" in breaker:
            fams["breaker"].add_metric([name], BREAKER_STATES.get(breaker["state"], 2))
        fams["pause"].add_metric([name], p.get("paused_for_s") or 0.0)
        if p.get("max_concurrency"):
            fams["in_use"].add_metric([name], p.get("permits_in_use") or 0)
        if p.get("daily_quota"):
            fams["quota_used"].add_metric([name], p.get("quota_used") or 0)
            fams["quota_limit"].add_metric([name], p["daily_quota"])
        if p.get("rate_limit_per_s"):
            fams["rate_limit"].add_metric([name], p["rate_limit_per_s"])
    yield from fams.values()


def _attempts(rows: list[totals.Total]) -> Iterable[Metric]:
    counter = CounterMetricFamily(
        "outbox_attempts", "Delivery attempts by outcome and error class (deferrals "
        "included: error_class rate_limited is a wait for the limiter).",
        labels=["provider", "operation", "outcome", "error_class"])
    codes = CounterMetricFamily("outbox_provider_responses",
                                "Provider HTTP answers by status code.",
                                labels=["provider", "status_code"])
    by_outcome: dict[tuple, int] = defaultdict(int)
    by_code: dict[tuple, int] = defaultdict(int)
    buckets: dict[tuple, list[int]] = defaultdict(lambda: [0] * (len(totals.BUCKETS_S) + 1))
    sums: dict[tuple, float] = defaultdict(float)
    for t in rows:
        by_outcome[t.provider, t.operation, t.outcome, t.error_class] += t.count
        if t.status_code:
            by_code[t.provider, str(t.status_code)] += t.count
        if t.outcome != "deferred":   # a deferral made no call: it has no duration
            buckets[t.provider, t.operation][t.bucket] += t.count
            sums[t.provider, t.operation] += t.duration_s_sum
    for labels, n in sorted(by_outcome.items()):
        counter.add_metric(list(labels), n)
    for labels, n in sorted(by_code.items()):
        codes.add_metric(list(labels), n)
    histogram = HistogramMetricFamily(
        "outbox_attempt_duration_seconds", "Duration of the calls made to providers.",
        labels=["provider", "operation"])
    for labels, counts in sorted(buckets.items()):
        cumulative, running = [], 0
        for bound, n in zip((*map(_le, totals.BUCKETS_S), "+Inf"), counts, strict=True):
            running += n
            cumulative.append((bound, running))
        histogram.add_metric(list(labels), cumulative, sums[labels])
    yield from (counter, codes, histogram)


def _le(bound: float) -> str:
    return repr(float(bound))
