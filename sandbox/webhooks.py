"""The sandbox plays the provider's side of webhooks: after each effect it records an event
and POSTs it, signed, to the configured URL, the way the real providers do.

- payments (Stripe-shaped): ``payment_intent.succeeded``, ``payment_intent.payment_failed``
  (a declined card), ``charge.refunded``; signed ``Stripe-Signature``. The same events, with
  the same ids, are listed by ``GET /v1/events`` (Stripe's pagination), for pollers.
- email (SendGrid-shaped events, Standard Webhooks signature): ``email.delivered``, or
  ``email.bounce`` for a recipient whose address contains ``bounce``.

Targets and switchable faults through ``/_sandbox/webhooks`` (GET, POST):
``{"payments": {"url": …, "secret": "whsec_…"}, "email": {…}, "faults": {"duplicate":
true, "out_of_order": true, "delay_s": 2, "bad_signature": true, "old_timestamp": true},
"paused": true}``. ``paused`` holds every event until it is unpaused (webhooks "missed"
until then, which a poller must make up for). A delivery that fails (no answer, or not
2xx) is tried again 5 times, 0.2 s to 3.2 s apart.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from typing import Any

import requests

from integrations.signatures import sign_standard, sign_stripe

RETRIES = 5
FAULTS = ("duplicate", "out_of_order", "delay_s", "bad_signature", "old_timestamp")


class WebhookSender:
    """Records events and sends them from one background thread."""

    def __init__(self, stopping: threading.Event):
        self.lock = threading.Lock()
        self.targets: dict[str, dict[str, str]] = {}
        self.faults: dict[str, Any] = {}
        self.paused = False
        self.events: list[dict] = []          # payments events, oldest first (GET /v1/events)
        self.sent = 0
        self.failed = 0
        self.retry_base_s = 0.2   # the first retry's wait; doubled each time
        self._seq = itertools.count(1)
        self._queue: queue.Queue = queue.Queue()
        self._held: list[tuple[str, dict, str]] = []
        self._stopping = stopping
        self._thread: threading.Thread | None = None
        self._http = requests.Session()

    # ---- configuration (the control API) ------------------------------------------------

    def configure(self, data: dict) -> str | None:
        """Apply a ``/_sandbox/webhooks`` POST; an error message, or None."""
        unknown = set(data) - {"payments", "email", "faults", "paused"}
        if unknown:
            return f"unknown webhook settings: {sorted(unknown)}"
        with self.lock:
            for flavor in ("payments", "email"):
                target = data.get(flavor)
                if target is None and flavor in data:
                    self.targets.pop(flavor, None)
                elif target is not None:
                    if not (isinstance(target, dict) and isinstance(target.get("url"), str)
                            and isinstance(target.get("secret"), str)):
                        return f"{flavor}: {{\"url\": …, \"secret\": …}}"
                    self.targets[flavor] = {"url": target["url"], "secret": target["secret"]}
            if "faults" in data:
                faults = data["faults"] or {}
                if not isinstance(faults, dict) or set(faults) - set(FAULTS):
                    return f"faults: a JSON object of {', '.join(FAULTS)}"
                self.faults = dict(faults)
            if "paused" in data:
                self.paused = bool(data["paused"])
        if not self.paused:
            for item in self._take_held():
                self._queue.put(item)
        return None

    def describe(self) -> dict:
        with self.lock:
            return {"targets": {f: {"url": t["url"]} for f, t in self.targets.items()},
                    "faults": dict(self.faults), "paused": self.paused, "sent": self.sent,
                    "failed": self.failed, "events": len(self.events),
                    "held": len(self._held)}

    def reset(self) -> None:
        with self.lock:
            self.faults, self.paused, self.events = {}, False, []
            self.sent = self.failed = 0
            self._held = []

    # ---- events ---------------------------------------------------------------------------

    def emit(self, flavor: str, event_type: str, obj: dict) -> dict:
        """Record an event about ``obj`` and queue its delivery."""
        n = next(self._seq)
        now = int(time.time())
        if flavor == "payments":
            event = {"id": f"evt_{n:024d}", "object": "event", "type": event_type,
                     "created": now, "livemode": False, "data": {"object": obj}}
            msg_id = event["id"]
        else:
            event = {"type": event_type, "timestamp": now, "data": obj}
            msg_id = f"msg_{n:024d}"
        with self.lock:
            if flavor == "payments":
                self.events.append(event)
            if self.paused:
                self._held.append((flavor, event, msg_id))
                return event
        self._queue.put((flavor, event, msg_id))
        self._ensure_thread()
        return event

    def list_events(self, query: dict[str, str]) -> tuple[int, dict]:
        """``GET /v1/events``: newest first; ``limit`` (1–100, 10), ``starting_after`` (older
        than that id), ``ending_before`` (the ``limit`` events just newer than that id),
        ``created[gte]``, ``type``. ``has_more`` as Stripe sets it."""
        try:
            limit = int(query.get("limit", "10"))
            since = int(query["created[gte]"]) if "created[gte]" in query else None
        except ValueError:
            return 400, {"error": {"type": "invalid_request_error",
                                   "message": "Invalid integer."}}
        if not 1 <= limit <= 100:
            return 400, {"error": {"type": "invalid_request_error", "param": "limit",
                                   "message": "limit must be between 1 and 100."}}
        with self.lock:
            items = [e for e in self.events
                     if (since is None or e["created"] >= since)
                     and query.get("type", e["type"]) == e["type"]]
        newest_first = list(reversed(items))
        ids = [e["id"] for e in newest_first]
        if "ending_before" in query:
            cursor = query["ending_before"]
            end = ids.index(cursor) if cursor in ids else _position(ids, cursor)
            page = newest_first[max(0, end - limit):end]
            has_more = end - limit > 0
        else:
            start = 0
            if "starting_after" in query:
                cursor = query["starting_after"]
                start = (ids.index(cursor) + 1 if cursor in ids
                         else _position(ids, cursor))
            page = newest_first[start:start + limit]
            has_more = start + limit < len(newest_first)
        return 200, {"object": "list", "url": "/v1/events", "has_more": has_more,
                     "data": page}

    # ---- sending ----------------------------------------------------------------------------

    def _take_held(self) -> list:
        with self.lock:
            held, self._held = self._held, []
        return held

    def _ensure_thread(self) -> None:
        with self.lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sandbox-webhooks",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        held_back = None
        while not self._stopping.is_set():
            try:
                item = self._queue.get(timeout=0.2 if held_back is None else 1.0)
            except queue.Empty:
                if held_back is not None:   # nothing came after it: send it now
                    self._deliver(*held_back)
                    held_back = None
                continue
            with self.lock:
                faults = dict(self.faults)
            if faults.get("out_of_order") and held_back is None:
                held_back = item            # sent after the next one
                continue
            self._deliver(*item)
            if held_back is not None:
                self._deliver(*held_back)
                held_back = None

    def _deliver(self, flavor: str, event: dict, msg_id: str) -> None:
        with self.lock:
            target = self.targets.get(flavor)
            faults = dict(self.faults)
        if target is None:
            return
        if faults.get("delay_s"):
            self._stopping.wait(float(faults["delay_s"]))
        for _ in range(2 if faults.get("duplicate") else 1):
            self._post(flavor, event, msg_id, target, faults)

    def _post(self, flavor, event, msg_id, target, faults) -> None:
        body = json.dumps(event).encode()
        for attempt in range(RETRIES + 1):
            at = int(time.time()) - (3600 if faults.get("old_timestamp") else 0)
            secret = target["secret"]
            if faults.get("bad_signature"):
                secret = ("whsec_" + "d3Jvbmctc2VjcmV0" if flavor == "email"
                          else secret + "-wrong")
            if flavor == "payments":
                headers = {"Stripe-Signature": sign_stripe(body, secret, at)}
            else:
                headers = {"webhook-id": msg_id, "webhook-timestamp": str(at),
                           "webhook-signature": sign_standard(body, secret, msg_id, at)}
            try:
                answer = self._http.post(target["url"], data=body, timeout=5, headers={
                    **headers, "Content-Type": "application/json"})
                if 200 <= answer.status_code < 300:
                    with self.lock:
                        self.sent += 1
                    return
            except requests.RequestException:
                pass
            if self._stopping.wait(self.retry_base_s * 2 ** attempt):
                return
        with self.lock:
            self.failed += 1


def _position(ids: list[str], cursor: str) -> int:
    """Where an id no longer listed would sit (ids sort by creation: ``evt_<sequence>``)."""
    for i, existing in enumerate(ids):   # newest first
        if existing < cursor:
            return i
    return len(ids)
