"""Alerts for teams without Prometheus: ``OUTBOX_ALERT_WEBHOOK_URL`` gets one JSON POST on
every change of the overall health level (ok, warning, critical).

The body is Slack-compatible (a ``text`` field) and carries levels and the reasons health
gives (thresholds and counts, never a payload, key or secret). It is sent through the
providers' HTTP policy (``integrations.http``): connect and read timeouts, TLS
verification with TLS 1.2 at least, ``http://`` only to loopback, no redirects followed.

The relay evaluates health every ``EVERY_S`` seconds. The last level seen is kept in
Redis and swapped atomically (``GETSET``), so with several relays one change makes one
POST; a POST that fails puts the old level back, so the next evaluation tries again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

import redis

from .base import Request
from .errors import ConfigurationError, IntegrationError
from .http import HttpClient
from .settings import ProviderSettings

log = logging.getLogger("outbox.alerts")

EVERY_S = 30.0
LEVEL_KEY = "outbox:alert:level"
MAX_REASONS = 10


def webhook_client(environ: Mapping[str, str] | None = None) -> tuple[HttpClient, str] | None:
    """The client and path for ``OUTBOX_ALERT_WEBHOOK_URL``, or None when it is unset.

    Raises:
        ConfigurationError: not an http(s) URL, or plain http to a host not on loopback.
    """
    env = os.environ if environ is None else environ
    url = env.get("OUTBOX_ALERT_WEBHOOK_URL", "").strip()
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError("OUTBOX_ALERT_WEBHOOK_URL must be an https:// URL")
    try:
        settings = ProviderSettings(name="alert", base_url=f"{parts.scheme}://{parts.netloc}",
                                    read_timeout_s=10.0, connect_timeout_s=5.0,
                                    max_concurrency=1)
    except ConfigurationError as exc:
        raise ConfigurationError(f"OUTBOX_ALERT_WEBHOOK_URL: {exc}") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return HttpClient(settings), path


def message(report: Mapping, previous: str | None) -> dict:
    """The POST body for ``report`` (``outbox.status.report``'s dict)."""
    level = report["level"]
    reasons = [f["reason"] for f in report.get("findings", ())]
    providers = {}
    for name, e in report.get("providers", {}).items():
        providers[name] = {"level": e["level"], "reasons": [f["reason"] for f in e["findings"]]}
        reasons += [f"{name}: {f['reason']}" for f in e["findings"]]
    head = f"integration-outbox health is {level.upper()}"
    if previous:
        head += f" (was {previous})"
    shown = reasons[:MAX_REASONS]
    more = f"\n… and {len(reasons) - len(shown)} more" if len(reasons) > len(shown) else ""
    text = head + ("\n" + "\n".join(f"• {r}" for r in shown) if shown else "") + more
    return {"text": text, "level": level, "previous": previous, "at": report.get("at"),
            "dead_awaiting": report.get("dead_awaiting"), "providers": providers}


class AlertNotifier:
    """Posts ``message`` when the level differs from the last one seen (see module doc)."""

    def __init__(self, client: HttpClient, path: str, store: redis.Redis):
        self._client = client
        self._path = path
        self._store = store

    def notify(self, report: Mapping) -> bool:
        """Post if the level changed; True when a POST was made and accepted."""
        level = report["level"]
        previous = self._store.getset(LEVEL_KEY, level)
        previous = previous.decode() if isinstance(previous, bytes) else previous
        if previous == level or (previous is None and level == "ok"):
            return False
        try:
            response = self._client.send(Request("POST", self._path,
                                                 json=message(report, previous)))
            if not 200 <= response.status_code < 300:
                raise IntegrationError(f"HTTP {response.status_code}")
        except IntegrationError as exc:
            log.warning("alert webhook failed (%s); will try again", exc.label())
            if previous is None:
                self._store.delete(LEVEL_KEY)
            else:
                self._store.set(LEVEL_KEY, previous)
            return False
        log.info("alert webhook: health %s (was %s)", level, previous or "unknown")
        return True
