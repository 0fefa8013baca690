"""The ``/_sandbox/`` control API: stats, reset, faults, runtime settings and OAuth revocation."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from sandbox import oauth
from sandbox.auth import mask_key
from sandbox.state import RateLimit, SandboxState

PREFIX = "/_sandbox/"


def _bad(message: str, status: int = 400) -> tuple[int, dict]:
    return status, {"error": {"type": "invalid_request_error", "message": message}}


def _json_body(body: bytes) -> Any:
    if not body.strip():
        return {}
    return json.loads(body)


def parse_rate_limit(spec: Any) -> RateLimit | None:
    """``{"limit": 20, "window_s": 1.0, "path_prefix": "/v3/"}`` (prefix optional) or None.

    Raises:
        ValueError: with the reason.
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError("rate_limit must be an object or null")
    unknown = set(spec) - {"limit", "window_s", "path_prefix"}
    if unknown:
        raise ValueError(f"unknown rate_limit settings: {sorted(unknown)}")
    limit, window, prefix = spec.get("limit"), spec.get("window_s"), spec.get("path_prefix")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError("rate_limit.limit must be an integer >= 1")
    if not isinstance(window, int | float) or isinstance(window, bool) or not 0 < window <= 86400:
        raise ValueError("rate_limit.window_s must be a number of seconds > 0")
    if prefix is not None and (not isinstance(prefix, str) or not prefix.startswith("/")):
        raise ValueError("rate_limit.path_prefix must be a path starting with '/'")
    return RateLimit(limit, float(window), prefix)


def _config(state: SandboxState) -> dict:
    with state.lock:
        return {"api_key": mask_key(state.api_key),
                "email_api_key": mask_key(state.email_api_key) if state.email_api_key else None,
                "idempotency": state.idempotency,
                "declined_customers": sorted(state.declined_customers),
                "rate_limit": state.rate_limit.to_dict() if state.rate_limit else None,
                "store_errors": state.store_errors, "search_lag_s": state.search_lag_s,
                "store_declines": state.store_declines,
                "clock_offset_s": state.clock_offset_s,
                **state.oauth.settings(),
                "crm_client_secret": mask_key(state.oauth.client_secret)}


def handle_control(state: SandboxState, method: str, path: str, query: str,
                   body: bytes) -> tuple[int, dict | list]:
    """Serve one control request; returns (status, JSON body)."""
    route = path[len(PREFIX):].rstrip("/")
    try:
        data = _json_body(body) if method in ("POST", "PUT") else {}
    except (ValueError, UnicodeDecodeError):
        return _bad("body must be JSON")

    if route == "stats":
        if method != "GET":
            return _bad("method not allowed", 405)
        log = parse_qs(query).get("log", ["1"])[-1] not in ("0", "false", "no")
        return 200, state.stats(include_log=log)

    if route == "reset":
        if method != "POST":
            return _bad("method not allowed", 405)
        state.reset()
        return 200, {"reset": True}

    if route == "faults":
        if method == "GET":
            return 200, {"faults": state.faults.list()}
        if method == "DELETE":
            state.faults.clear()
            return 200, {"cleared": True}
        if method == "POST":
            try:
                rule = state.faults.add(data)
            except ValueError as exc:
                return _bad(str(exc))
            return 200, {"id": rule.id, "fault": rule.to_dict()}
        return _bad("method not allowed", 405)

    if route.startswith("faults/"):
        if method != "DELETE":
            return _bad("method not allowed", 405)
        try:
            rule_id = int(route.split("/", 1)[1])
        except ValueError:
            return _bad("fault id must be an integer")
        if not state.faults.remove(rule_id):
            return _bad(f"no fault {rule_id}", 404)
        return 200, {"deleted": rule_id}

    if route == "oauth/revoke":
        if method != "POST":
            return _bad("method not allowed", 405)
        return 200, {"revoked_grants": state.oauth.revoke_all()}

    if route == "webhooks":
        if method == "POST":
            if not isinstance(data, dict):
                return _bad("body must be a JSON object")
            problem = state.webhooks.configure(data)
            if problem:
                return _bad(problem)
        elif method != "GET":
            return _bad("method not allowed", 405)
        return 200, state.webhooks.describe()

    if route == "config":
        if method == "POST":
            if not isinstance(data, dict):
                return _bad("body must be a JSON object")
            unknown = set(data) - {"api_key", "email_api_key", "idempotency",
                                   "declined_customers", "rate_limit", "store_errors",
                                   "search_lag_s", "store_declines", "advance_clock_s",
                                   *oauth.SETTINGS}
            if unknown:
                return _bad(f"unknown settings: {sorted(unknown)}")
            key, idem = data.get("api_key"), data.get("idempotency")
            # email_api_key absent: unchanged; null: share the payments key again.
            email_key = data["email_api_key"] if "email_api_key" in data else False
            if key is not None and not (isinstance(key, str) and key):
                return _bad("api_key must be a non-empty string")
            if email_key not in (False, None) and not (isinstance(email_key, str) and email_key):
                return _bad("email_api_key must be a non-empty string or null")
            try:
                # Absent: unchanged; null: removed.
                limit = parse_rate_limit(data["rate_limit"]) if "rate_limit" in data else False
            except ValueError as exc:
                return _bad(str(exc))
            if idem is not None and not isinstance(idem, bool):
                return _bad("idempotency must be true or false")
            declined = data.get("declined_customers")
            if declined is not None and not (isinstance(declined, list)
                                             and all(isinstance(c, str) for c in declined)):
                return _bad("declined_customers must be a list of customer ids")
            store_errors, lag = data.get("store_errors"), data.get("search_lag_s")
            store_declines, advance = data.get("store_declines"), data.get("advance_clock_s")
            for name, flag in (("store_errors", store_errors), ("store_declines", store_declines)):
                if flag is not None and not isinstance(flag, bool):
                    return _bad(f"{name} must be true or false")
            if advance is not None and (not isinstance(advance, int | float)
                                        or isinstance(advance, bool) or not 0 <= advance <= 1e7):
                return _bad("advance_clock_s must be a number of seconds from 0 to 10000000")
            if lag is not None and (not isinstance(lag, int | float) or isinstance(lag, bool)
                                    or not 0 <= lag <= 3600):
                return _bad("search_lag_s must be a number of seconds from 0 to 3600")
            try:
                crm = oauth.parse_settings({k: data[k] for k in oauth.SETTINGS if k in data})
            except ValueError as exc:
                return _bad(str(exc))
            state.configure(api_key=key, idempotency=idem, declined_customers=declined,
                            email_api_key=email_key, rate_limit=limit,
                            store_errors=store_errors, search_lag_s=lag,
                            store_declines=store_declines, advance_clock_s=advance)
            state.oauth.configure(crm)
        elif method != "GET":
            return _bad("method not allowed", 405)
        return 200, _config(state)

    return _bad(f"unknown control path {path}", 404)

