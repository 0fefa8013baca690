"""In-process state of the sandbox: settings, effect accounting, idempotency store, objects."""

from __future__ import annotations

import collections
import copy
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from sandbox.faults import FaultTable
from sandbox.hooks import Hooks
from sandbox.oauth import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, OAuthState
from sandbox.webhooks import WebhookSender

LOG_CAP = 100_000
DEFAULT_DECLINED_CUSTOMERS = ("cus_declined", "cus_insufficient")
DEFAULT_SEARCH_LAG_S = 1.0
KEY_TTL_S = 24 * 3600


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` requests admitted in any ``window_s`` seconds (a sliding log).

    Applies to provider paths starting with ``path_prefix`` (every provider path when
    None); the control API is never limited. Requests answered 429 are not admitted, so
    they do not extend the wait.
    """

    limit: int
    window_s: float
    path_prefix: str | None = None

    def applies_to(self, path: str) -> bool:
        """True if requests on ``path`` count against this limit."""
        return self.path_prefix is None or path.startswith(self.path_prefix)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as accepted by ``POST /_sandbox/config``."""
        return {"limit": self.limit, "window_s": self.window_s, "path_prefix": self.path_prefix}


@dataclass
class StoredResult:
    """What an idempotency key maps to: in progress, or a finished response."""

    fingerprint: tuple
    status: int | None = None
    body: dict | None = None
    created: float = 0.0   # the sandbox clock's time of the key's first request

    @property
    def in_progress(self) -> bool:
        """True until the first request with the key has stored its result."""
        return self.status is None


class SandboxState:
    """All mutable sandbox state behind one lock; every method is thread-safe."""

    def __init__(self, api_key: str, email_api_key: str | None = None,
                 crm_client_id: str = DEFAULT_CLIENT_ID,
                 crm_client_secret: str = DEFAULT_CLIENT_SECRET) -> None:
        """Start empty with ``api_key`` as the accepted payments key.

        ``email_api_key`` is the key the email API accepts; None shares the payments key
        (then rotating ``api_key`` rotates both). The CRM's OAuth server knows one client.
        """
        self.lock = threading.RLock()
        self.api_key = api_key
        self.email_api_key = email_api_key
        self.rate_limit: RateLimit | None = None
        self._admitted: collections.deque[float] = collections.deque()
        self.idempotency = True
        # Stripe stores a 500 under its key and replays it; False: store the success the
        # endpoint produced instead (the sandbox's behaviour before issue 10).
        self.store_errors = True
        # Stripe keeps a decline under its key for 24 h; off by default, so that the demo's
        # "fix the card, re-drive" goes through under the same key.
        self.store_declines = False
        # Seconds added to the sandbox's clock (idempotency keys expire after 24 h of it).
        self.clock_offset_s = 0.0
        # How long a new payment intent takes to show in the search (Stripe: up to a minute).
        self.search_lag_s = DEFAULT_SEARCH_LAG_S
        # Customers whose card declines; an operator "fixes the card data" by removing one.
        self.declined_customers = set(DEFAULT_DECLINED_CUSTOMERS)
        self.faults = FaultTable()
        # Set when the server stops, so sleeping and hanging requests end early.
        self.stopping = threading.Event()
        self.webhooks = WebhookSender(self.stopping)
        self.oauth = OAuthState(self.lock, self.now, crm_client_id, crm_client_secret)
        self.hooks = Hooks(self.stopping)   # the receiver of the outbox's own webhooks
        self._generation = 0
        self._clear()

    def _clear(self) -> None:
        self.requests_total = 0
        self.effects_total = 0
        self.effects_by_key: collections.Counter[str] = collections.Counter()
        self.requests_by_key: collections.Counter[str] = collections.Counter()
        self.status_counts: collections.Counter[str] = collections.Counter()
        # Requests still running from before a reset are not counted: max_in_flight is
        # the most that overlapped among requests that arrived since (what a test asserts).
        self._in_flight = 0
        self.max_in_flight = 0
        self.request_log: collections.deque[dict] = collections.deque(maxlen=LOG_CAP)
        # Keys in the order their effects happened (what ordered delivery is judged by).
        self.effect_log: collections.deque[str] = collections.deque(maxlen=LOG_CAP)
        self.idem: dict[str, StoredResult] = {}
        self.payment_intents: dict[str, dict] = {}
        # When each payment intent shows in the search (its creation + search_lag_s).
        self.searchable_at: dict[str, float] = {}
        self.refunds: dict[str, dict] = {}
        # Accepted emails by X-Message-Id: {"key", "to", "subject", "t"} (no bodies).
        self.emails: dict[str, dict] = {}
        # CRM contacts by lower-cased e-mail: {"id", "properties", "created", "updated"}.
        self.contacts: dict[str, dict] = {}
        self._admitted.clear()

    def reset(self) -> None:
        """Forget requests, effects, objects, stored keys, OAuth grants, faults and the rate
        limit; keep the API keys and the OAuth client."""
        with self.lock:
            # Requests still running belong to the old generation and must not leak into the new one.
            self._generation += 1
            self.idempotency = True
            self.store_errors = True
            self.store_declines = False
            self.clock_offset_s = 0.0
            self.search_lag_s = DEFAULT_SEARCH_LAG_S
            self.rate_limit = None
            self.declined_customers = set(DEFAULT_DECLINED_CUSTOMERS)
            self.faults.clear()
            self.webhooks.reset()
            self.oauth.reset()
            self.hooks.reset()
            self._clear()

    def configure(self, api_key: str | None = None, idempotency: bool | None = None,
                  declined_customers: list[str] | None = None,
                  email_api_key: str | None | bool = False,
                  rate_limit: RateLimit | None | bool = False,
                  store_errors: bool | None = None,
                  search_lag_s: float | None = None,
                  store_declines: bool | None = None,
                  advance_clock_s: float | None = None) -> None:
        """Change the accepted API keys, switch idempotency handling, set the declining customers.

        ``email_api_key``: a key, None to share the payments key again, False (default) to
        leave it. ``rate_limit``: a ``RateLimit`` to install (its window starts empty), None
        to remove it, False (default) to leave it.
        """
        with self.lock:
            if store_errors is not None:
                self.store_errors = store_errors
            if store_declines is not None:
                self.store_declines = store_declines
            if advance_clock_s is not None:
                self.clock_offset_s += advance_clock_s
            if search_lag_s is not None:
                self.search_lag_s = search_lag_s
            if email_api_key is not False:
                self.email_api_key = email_api_key
            if rate_limit is not False:
                self.rate_limit = rate_limit
                self._admitted.clear()
            if declined_customers is not None:
                self.declined_customers = set(declined_customers)
            if api_key is not None:
                self.api_key = api_key
            if idempotency is not None:
                self.idempotency = idempotency

    @property
    def effective_email_api_key(self) -> str:
        """The key the email API accepts: its own, or the payments key when it has none."""
        with self.lock:
            return self.email_api_key or self.api_key

    # --- request accounting -------------------------------------------------

    def begin_request(self, path: str, key: str) -> dict:
        """Count an arriving provider request; returns its log entry (pass to end_request)."""
        with self.lock:
            # time.time() under the lock keeps request_log ordered by arrival.
            entry = {"t": time.time(), "t_end": None, "path": path, "key": key, "status": None}
            self.requests_total += 1
            self.requests_by_key[key] += 1
            self.request_log.append(entry)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            return {"entry": entry, "gen": self._generation}

    def rekey_request(self, token: dict, key: str) -> None:
        """Move a counted request to ``key`` (the email API learns its key from the body)."""
        with self.lock:
            entry = token["entry"]
            old, entry["key"] = entry["key"], key
            if old == key or token["gen"] != self._generation:
                return
            self.requests_by_key[old] -= 1
            if self.requests_by_key[old] <= 0:
                del self.requests_by_key[old]
            self.requests_by_key[key] += 1

    def admit(self, path: str) -> int | None:
        """Apply the rate limit to a request arriving on ``path``.

        Returns None when the request is admitted (and counted in the window), or the
        whole seconds (>= 1) until the window has room: the ``Retry-After`` to send.
        """
        with self.lock:
            limit = self.rate_limit
            if limit is None or not limit.applies_to(path):
                return None
            now = time.monotonic()
            admitted = self._window(limit, now)
            if len(admitted) < limit.limit:
                admitted.append(now)
                return None
            # Room comes back when enough of the oldest admissions have left the window.
            frees_at = admitted[len(admitted) - limit.limit] + limit.window_s
            return max(1, math.ceil(frees_at - now))

    def _window(self, limit: RateLimit, now: float) -> collections.deque[float]:
        """The admissions still inside ``limit``'s window (older ones dropped); under the lock."""
        admitted = self._admitted
        while admitted and admitted[0] <= now - limit.window_s:
            admitted.popleft()
        return admitted

    def rate_limit_headers(self, path: str) -> dict[str, str]:
        """SendGrid's ``X-RateLimit-Limit``/``-Remaining``/``-Reset`` (epoch seconds) for a
        request on ``path``, after its admission; {} when no limit applies to it."""
        with self.lock:
            limit = self.rate_limit
            if limit is None or not limit.applies_to(path):
                return {}
            now = time.monotonic()
            admitted = self._window(limit, now)
            # Room comes back when the oldest admission in the window leaves it.
            frees_in = (admitted[0] + limit.window_s - now) if admitted else 0.0
            return {"X-RateLimit-Limit": str(limit.limit),
                    "X-RateLimit-Remaining": str(max(limit.limit - len(admitted), 0)),
                    "X-RateLimit-Reset": str(math.ceil(time.time() + frees_in))}

    def end_request(self, token: dict, status: int | str) -> None:
        """Record the outcome (an HTTP status, or "dropped") of a request."""
        with self.lock:
            entry = token["entry"]
            entry["t_end"] = time.time()
            entry["status"] = status
            if token["gen"] == self._generation:
                self._in_flight -= 1
                self.status_counts[str(status)] += 1

    def record_effect(self, key: str) -> None:
        """Count one object actually created under ``key`` ("" when the request had none)."""
        with self.lock:
            self.effects_total += 1
            self.effects_by_key[key] += 1
            self.effect_log.append(key)

    def stats(self, include_log: bool = True) -> dict[str, Any]:
        """Snapshot of the accounting, as served by ``GET /_sandbox/stats``."""
        with self.lock:
            out: dict[str, Any] = {
                "requests_total": self.requests_total,
                "effects_total": self.effects_total,
                "effects_by_key": dict(self.effects_by_key),
                "requests_by_key": dict(self.requests_by_key),
                "status_counts": dict(self.status_counts),
                "in_flight": self._in_flight,
                "max_in_flight": self.max_in_flight,
                "faults": self.faults.list(),
                "emails_total": len(self.emails),
                "crm": {**self.oauth.stats(), "contacts": len(self.contacts)},
                "hooks": self.hooks.stats(include_log),
            }
            if include_log:
                out["request_log"] = [dict(e) for e in self.request_log]
                out["effect_log"] = list(self.effect_log)
            return out

    # --- idempotency --------------------------------------------------------

    def now(self) -> float:
        """The sandbox's clock: epoch seconds, moved forward by ``/_sandbox/config
        {"advance_clock_s": N}`` (idempotency keys expire after 24 h of it)."""
        return time.time() + self.clock_offset_s

    def idem_claim(self, key: str, fingerprint: tuple) -> tuple[str, StoredResult | None]:
        """Look up ``key``: returns ("new" | "replay" | "conflict" | "in_use", stored).

        "new" marks the key in progress; the caller must later call idem_store or idem_release.
        """
        with self.lock:
            now = self.now()
            stored = self.idem.get(key)
            if stored is not None and now - stored.created >= KEY_TTL_S:
                stored = None   # Stripe: "keys are eligible to be removed after 24 hours"
            if stored is None:
                self.idem[key] = StoredResult(fingerprint, created=now)
                return "new", None
            if stored.fingerprint != fingerprint:
                return "conflict", stored
            if stored.in_progress:
                return "in_use", stored
            return "replay", stored

    def idem_store(self, key: str, status: int, body: dict) -> None:
        """Save the finished response for ``key``."""
        with self.lock:
            stored = self.idem.get(key)
            if stored is not None and stored.in_progress:
                stored.status, stored.body = status, copy.deepcopy(body)

    def idem_release(self, key: str) -> None:
        """Forget an in-progress key whose result must not be saved (validation error, crash)."""
        with self.lock:
            stored = self.idem.get(key)
            if stored is not None and stored.in_progress:
                del self.idem[key]
