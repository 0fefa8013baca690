"""A webhook receiver on the sandbox, for the ``webhooks`` provider (``make run``'s demo and
the tests): ``POST /_sandbox/hooks/{name}`` records each delivery and answers 204.

    POST /_sandbox/hooks/{name}          a delivery: counted per ``webhook-id``
    POST /_sandbox/hooks/{name}/config   {"status": 503|410|429|…, "retry_after": "2",
                                          "delay_s": 5, "secret": "whsec_…"}; null clears
    GET  /_sandbox/stats                 ``hooks``: per name, received, by_id, verified…

With a ``secret`` (or ``SANDBOX_WEBHOOKS_SECRET`` for every name) each delivery is
verified with the ``standardwebhooks`` library, as a customer would, and counted as
``verified`` or ``unverified``. The log keeps each delivery's body and ``webhook-*``
headers, so that a test can verify it again under any secret.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

PREFIX = "/_sandbox/hooks/"
LOG_CAP = 1000
_SETTINGS = {"status", "retry_after", "delay_s", "secret"}
_SIGNED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class Hooks:
    """What the receiver got, per hook name, and how each name answers."""

    def __init__(self, stopping: threading.Event, secret: str | None = None):
        """Args: stopping: set when the server stops (ends a delay early); secret: the
        default signing secret to verify with (``SANDBOX_WEBHOOKS_SECRET``)."""
        self._stopping = stopping
        self._default_secret = secret if secret is not None else (
            os.environ.get("SANDBOX_WEBHOOKS_SECRET") or None)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every delivery and setting."""
        with self._lock:
            self._settings: dict[str, dict[str, Any]] = {}
            self._by_id: dict[str, collections.Counter[str]] = collections.defaultdict(
                collections.Counter)
            self._verified: collections.Counter[str] = collections.Counter()
            self._unverified: collections.Counter[str] = collections.Counter()
            self._log: dict[str, collections.deque] = collections.defaultdict(
                lambda: collections.deque(maxlen=LOG_CAP))

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, Any, dict[str, str]]:
        """Serve one request under ``PREFIX``: (status, JSON body or None, headers)."""
        name, _, rest = path[len(PREFIX):].rstrip("/").partition("/")
        if not name or rest not in ("", "config"):
            return 404, {"error": f"unknown hook path {path}"}, {}
        if method != "POST":
            return 405, {"error": "method not allowed"}, {}
        if rest == "config":
            return self._configure(name, body)
        return self._receive(name, headers, body)

    def _configure(self, name: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        try:
            data = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError):
            return 400, {"error": "body must be JSON"}, {}
        if not isinstance(data, dict) or set(data) - _SETTINGS:
            return 400, {"error": f"a JSON object of {sorted(_SETTINGS)}"}, {}
        status, delay = data.get("status"), data.get("delay_s")
        if status is not None and not (isinstance(status, int) and 200 <= status <= 599):
            return 400, {"error": "status must be an HTTP status (200-599)"}, {}
        if delay is not None and not (isinstance(delay, int | float) and 0 <= delay <= 300):
            return 400, {"error": "delay_s must be seconds from 0 to 300"}, {}
        with self._lock:
            settings = self._settings.setdefault(name, {})
            for key, value in data.items():
                if value is None:
                    settings.pop(key, None)
                else:
                    settings[key] = value
            shown = {k: v for k, v in settings.items() if k != "secret"}
        return 200, {"hook": name, **shown}, {}

    def _receive(self, name: str, headers: Mapping[str, str],
                 body: bytes) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            settings = dict(self._settings.get(name, {}))
        secret = settings.get("secret") or self._default_secret
        verified = None
        if secret:
            try:
                Webhook(secret).verify(body, dict(headers), json_parse=False)
                verified = True
            except WebhookVerificationError:
                verified = False
        try:
            event_type = json.loads(body).get("type")
        except (ValueError, UnicodeDecodeError, AttributeError):
            event_type = None
        webhook_id = headers.get("webhook-id") or ""
        with self._lock:
            self._by_id[name][webhook_id] += 1
            if verified is not None:
                (self._verified if verified else self._unverified)[name] += 1
            self._log[name].append({
                "id": webhook_id, "type": event_type, "at": time.time(), "verified": verified,
                "headers": {h: headers.get(h) for h in _SIGNED_HEADERS},
                "body": body.decode("utf-8", "replace")})
        if settings.get("delay_s"):
            self._stopping.wait(settings["delay_s"])
        status = settings.get("status", 204)
        extra = ({"Retry-After": str(settings["retry_after"])}
                 if settings.get("retry_after") is not None else {})
        return status, None if status == 204 else {"hook": name, "status": status}, extra

    def stats(self, include_log: bool = True) -> dict[str, Any]:
        """Per hook name: ``received``, ``by_id`` (deliveries per webhook-id), ``verified``,
        ``unverified`` and, with ``include_log``, ``log`` (id, type, time, verified, the
        ``webhook-*`` headers and the body; the last 1,000)."""
        with self._lock:
            return {name: {"received": sum(ids.values()), "by_id": dict(ids),
                           "verified": self._verified[name],
                           "unverified": self._unverified[name],
                           **({"log": list(self._log[name])} if include_log else {})}
                    for name, ids in self._by_id.items()}
