"""Fault rules: what the sandbox does wrong, to which requests, and how many times."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

# Faults answered before the endpoint runs (no effect) versus after it (effect applied).
PRE_EFFECT = {"error_before", "rate_limit", "status", "down"}
POST_EFFECT = {"error_after", "drop_after", "slow_after"}
FAULT_NAMES = PRE_EFFECT | POST_EFFECT | {"latency"}

_COMMON = {"fault", "count", "match_key", "path"}
_PARAMS: dict[str, dict[str, Any]] = {
    "latency": {"delay_s": 0.1},
    "error_before": {"status": 503},
    "error_after": {"status": 500},
    "rate_limit": {"retry_after": "1"},
    "drop_after": {},
    "slow_after": {"delay_s": 30.0},
    "status": {"status": 400, "body": None},
    "down": {"mode": "503"},
}


@dataclass
class FaultRule:
    """One fault rule; ``remaining`` is None for unlimited."""

    id: int
    fault: str
    params: dict[str, Any]
    remaining: int | None = None
    match_key: str | None = None
    path: str | None = None
    hits: int = field(default=0)

    def matches(self, path: str, key: str | None) -> bool:
        """True if the rule still applies to a request on ``path`` with ``key``."""
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.path is not None and self.path != path:
            return False
        if self.match_key is not None and (key is None or self.match_key not in key):
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description of the rule."""
        return {
            "id": self.id,
            "fault": self.fault,
            "count": self.remaining,
            "match_key": self.match_key,
            "path": self.path,
            "hits": self.hits,
            **self.params,
        }


def parse_rule(spec: dict[str, Any], rule_id: int) -> FaultRule:
    """Validate a control-API fault spec and build a rule; raises ValueError with a reason."""
    if not isinstance(spec, dict):
        raise ValueError("body must be a JSON object")
    name = spec.get("fault")
    if name not in FAULT_NAMES:
        raise ValueError(f"unknown fault {name!r}; expected one of {sorted(FAULT_NAMES)}")
    unknown = set(spec) - _COMMON - set(_PARAMS[name])
    if unknown:
        raise ValueError(f"unknown parameters for {name}: {sorted(unknown)}")
    params = {k: spec.get(k, default) for k, default in _PARAMS[name].items()}
    count = spec.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise ValueError("count must be a non-negative integer")
    for opt in ("match_key", "path"):
        if spec.get(opt) is not None and not isinstance(spec[opt], str):
            raise ValueError(f"{opt} must be a string")
    if "delay_s" in params:
        delay = params["delay_s"]
        if not isinstance(delay, int | float) or isinstance(delay, bool) or delay < 0:
            raise ValueError("delay_s must be a non-negative number")
        params["delay_s"] = float(delay)
    if "status" in params:
        status = params["status"]
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
    if name == "rate_limit" and params["retry_after"] is not None:
        params["retry_after"] = str(params["retry_after"])
    if name == "down" and params["mode"] not in ("503", "hang"):
        raise ValueError("mode must be '503' or 'hang'")
    if name == "status" and params["body"] is not None and not isinstance(params["body"], dict):
        raise ValueError("body must be a JSON object")
    return FaultRule(rule_id, name, params, count, spec.get("match_key"), spec.get("path"))


class FaultTable:
    """Thread-safe ordered list of fault rules."""

    def __init__(self) -> None:
        """Start with no rules."""
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._ids = itertools.count(1)

    def add(self, spec: dict[str, Any]) -> FaultRule:
        """Validate ``spec`` and append it; raises ValueError on a bad spec."""
        with self._lock:
            rule = parse_rule(spec, next(self._ids))
            self._rules.append(rule)
            return rule

    def clear(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._rules.clear()

    def remove(self, rule_id: int) -> bool:
        """Remove one rule by id; False if it did not exist."""
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    def active(self, rule_id: int) -> bool:
        """True while the rule is still in the table (a hanging ``down`` polls this)."""
        with self._lock:
            return any(r.id == rule_id for r in self._rules)

    def pick(self, path: str, key: str | None) -> FaultRule | None:
        """Return the first rule matching the request and consume one of its count."""
        with self._lock:
            for rule in self._rules:
                if rule.matches(path, key):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    rule.hits += 1
                    return rule
            return None

    def list(self) -> list[dict[str, Any]]:
        """JSON-ready list of all rules, in match order."""
        with self._lock:
            return [r.to_dict() for r in self._rules]
