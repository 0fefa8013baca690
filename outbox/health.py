"""Health, computed in one place: from the outbox's figures and the providers' live state to
a level (ok, warning, critical) and the reasons for it.

``outbox status`` (and its exit code: 0 ok, 1 warning, 2 critical) uses this; so will the
admin app's ``/health``. Each finding names the threshold that tripped, e.g.
``error rate 27 % over 5 min ≥ 5 % (503 ×40, 500 ×12)``.

Thresholds (``Thresholds``; the README's "Health" table):

    signal                      warning                 critical
    error rate, 5 minutes       1 %                     5 %
    queue depth (waiting)       100                     1,000
    dead letters, last hour     any                     10
    circuit breaker             open or half-open       open for more than 5 minutes
    p99 latency, 5 minutes      2 × baseline            5 × baseline
    credential                  —                       cannot be read
    synthetic health check      fails                   credentials rejected
    provider settings           —                       invalid
    Redis (limits, breakers)    —                       unreachable: state unknown
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

OK, WARNING, CRITICAL = "ok", "warning", "critical"
_ORDER = {OK: 0, WARNING: 1, CRITICAL: 2}


@dataclass(frozen=True)
class Thresholds:
    """Warning and critical levels, as (warning, critical) pairs."""

    depth: tuple[int, int] = (100, 1000)
    dead_per_hour: tuple[int, int] = (1, 10)
    error_rate: tuple[float, float] = (0.01, 0.05)
    breaker_open_s: float = 300.0
    latency: tuple[float, float] = (2.0, 5.0)   # × the provider's p99 baseline
    latency_min_attempts: int = 10   # fewer attempts in 5 minutes: no p99 judged


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Finding:
    """One tripped threshold: which check, how bad, and why in words."""

    check: str
    level: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def worst(levels: Iterable[str]) -> str:
    """The most severe of ``levels`` (ok when empty)."""
    return max(levels, key=_ORDER.__getitem__, default=OK)


def exit_code(level: str) -> int:
    """0 ok, 1 warning, 2 critical: for scripts and cron."""
    return _ORDER[level]


def _level(value: float, levels: tuple[float, float]) -> tuple[str, float]:
    """The level ``value`` reaches, and the threshold it passed (None when ok)."""
    if value >= levels[1]:
        return CRITICAL, levels[1]
    if value >= levels[0]:
        return WARNING, levels[0]
    return OK, None


def provider_findings(stats: Mapping, facts: Mapping | None, now_epoch_s: float,
                      thresholds: Thresholds = DEFAULT_THRESHOLDS) -> list[Finding]:
    """Findings for one provider.

    Args:
        stats: the provider's figures from ``outbox.status`` (``depth``, ``dead_last_hour``,
            ``attempts_5m``, ``failures_5m``, ``failures_by_code_5m``, ``p99_ms_5m``).
        facts: its live state, gathered by the process that asks (``protection``: the
            shared limiter/breaker snapshot, ``credential``: None or why it cannot be read,
            ``settings_error``: None or why its settings are invalid,
            ``latency_baseline_ms``: its p99 baseline, ``check``: its last synthetic
            health check, see ``integrations.checks``); None: unknown.
        now_epoch_s: the current time, to age an open breaker.
    """
    found: list[Finding] = []
    t = thresholds
    rate = stats["failures_5m"] / stats["attempts_5m"] if stats["attempts_5m"] else 0.0
    level, bound = _level(rate, t.error_rate)
    if level != OK:
        codes = ", ".join(f"{code} ×{n}" for code, n in stats["failures_by_code_5m"].items())
        found.append(Finding("error_rate", level,
                             f"error rate {rate:.0%} over 5 min ≥ {bound:.0%} ({codes})"))
    level, bound = _level(stats["depth"], t.depth)
    if level != OK:
        found.append(Finding("depth", level, f"queue depth {stats['depth']:,} ≥ {bound:,}"))
    level, _ = _level(stats["dead_last_hour"], t.dead_per_hour)
    if level != OK:
        found.append(Finding("dead_letters", level,
                             f"{stats['dead_last_hour']} dead letter(s) in the last hour"
                             + (f" ≥ {t.dead_per_hour[1]}" if level == CRITICAL else "")))
    if facts is None:
        return found
    check = facts.get("check")
    if check is not None and not check.get("ok"):
        found.append(Finding("check", CRITICAL if check.get("rejected") else WARNING,
                             f"health check: {check['reason']}"))
    baseline = facts.get("latency_baseline_ms")
    p99 = stats.get("p99_ms_5m")
    if baseline and p99 is not None and stats["attempts_5m"] >= t.latency_min_attempts:
        level, factor = _level(p99 / baseline, t.latency)
        if level != OK:
            found.append(Finding("latency", level, f"p99 latency {p99:,.0f} ms over 5 min ≥ "
                                                   f"{factor:g} × baseline {baseline:,.0f} ms"))
    if facts.get("settings_error"):
        found.append(Finding("settings", CRITICAL, f"settings invalid: {facts['settings_error']}"))
    if facts.get("credential"):
        found.append(Finding("credential", CRITICAL, f"credential unavailable: {facts['credential']}"))
    breaker = (facts.get("protection") or {}).get("breaker") or {}
    if breaker.get("state", "closed") != "closed":
        opened_at = breaker.get("opened_at")
        open_s = now_epoch_s - opened_at if opened_at else 0.0
        level = CRITICAL if open_s > t.breaker_open_s else WARNING
        found.append(Finding("breaker", level, f"circuit breaker {breaker['state']} for "
                                               f"{open_s:.0f} s"
                                               + (f" > {t.breaker_open_s:.0f} s"
                                                  if level == CRITICAL else "")))
    return found


def redis_findings(facts: Mapping[str, Mapping]) -> list[Finding]:
    """One critical finding when any provider's shared state could not be read from Redis."""
    errors = sorted({f["protection"]["error"] for f in facts.values()
                     if (f.get("protection") or {}).get("error")})
    if not errors:
        return []
    return [Finding("redis", CRITICAL, f"{errors[0]}: rate limits, quotas and circuit breakers "
                                       "are unknown, and workers defer every call")]
