"""OAuth2 for providers that need it (``crm``): the authorisation-code flow with PKCE and a
random ``state`` (``outbox crm connect``), and access tokens refreshed ahead of expiry,
once for the whole fleet. The protocol itself is authlib's (``OAuth2Session``); this
module decides when to call it and what to keep.

Where tokens live: a ``GrantStore`` (``outbox.grants`` keeps them in the outbox database,
Fernet-encrypted; ``integrations`` cannot import ``outbox``, so the store is installed with
``use_grant_store`` when ``outbox`` is imported). Tokens never reach logs, task arguments,
exceptions or ``repr``.

**Refresh ahead of expiry.** An access token is refreshed once ``REFRESH_AT`` (80 %) of
its lifetime has passed, not when it fails. Single-flight across every worker process and
thread: the refresher holds a Redis lock (``outbox:<provider>:oauth-refresh``, a lease of
``lock_s`` renewed while the refresh runs, so that a dead worker's lapses soon) and re-reads
the grant after taking it — if another worker refreshed meanwhile, it uses that; within a
process one thread refreshes and a thread whose token was refused compares the grant it was
handed with the stored one. Others keep using the current token, which is
still valid for the last 20 % of its life; one whose token is about to expire waits for the
refresher (up to ``WAIT_FOR_REFRESH_S``), then defers. A token is never sent within
``margin_s`` of its expiry: the provider sees no request with an expired token.

**Refresh-token rotation, crash-safe.** The provider answers a refresh with a new refresh
token and retires the old one. The new pair replaces the old in one conditional UPDATE (over
the version it was refreshed from), so the old token is kept until the new one is committed.
A worker killed between the answer and the commit loses the new pair; the grant stays
marked (``refresh_started_at``) and counts as due, so the next refresher (the lock lapses
within ``lock_s``) redeems the same old refresh token again at once — servers that
rotate (Okta's grace period, Auth0's reuse interval, the sandbox's ``crm_refresh_grace_s``)
answer that replay with the same new pair for a short window, instead of calling it a reuse
attack and revoking the grant. An answer received but not saved (the database failed) is
kept in memory and saved, not redeemed again; one without a usable ``expires_in`` is kept
with ``DEFAULT_LIFETIME_S``.

**Revocation.** ``invalid_grant`` on refresh (or HubSpot's own 400 ``BAD_REFRESH_TOKEN``)
means the grant is gone (revoked, expired, reuse detected): it is marked revoked and every call defers (``CredentialUnavailable``, no
attempt consumed) with "re-authorisation required"; health is critical. ``outbox crm
connect`` stores a new grant and the deferred messages go out without a re-drive. A 401
from the API makes the provider call ``refresh()``: the grant is re-read, and refreshed
unless another worker already did; if that refresh fails the call defers (the refused token
is not sent again). A failed refresh is not retried for ``REFRESH_FAILED_RETRY_S`` while
the token lasts.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Protocol

import redis
import requests
from authlib.common.errors import AuthlibBaseError
from authlib.common.security import generate_token
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.requests_client import OAuth2Session

from integrations.credentials import ApiKey
from integrations.errors import (
    ConfigurationError,
    CredentialUnavailable,
    Deferred,
    IntegrationError,
)
from integrations.http import pinned_session
from integrations.sanitize import sanitize
from integrations.settings import check_base_url, env_name, get_int, get_str

log = logging.getLogger("integrations.oauth")

REFRESH_AT = 0.8                 # refresh once this share of the token's lifetime has passed
DEFAULT_LIFETIME_S = 300.0       # a token whose answer gives no usable expires_in
GRANT_CACHE_S = 5.0              # a process re-reads its grant at least this often
WAIT_FOR_REFRESH_S = 10.0        # how long a worker with an expiring token waits for the refresher
REAUTHORIZE_RETRY_S = 30.0       # a message deferred for re-authorisation is tried again after this
REFRESH_FAILED_RETRY_S = 10.0    # ... and one deferred because the token endpoint failed
REAUTHORIZATION_REQUIRED = "reauthorization_required"
REFRESH_IN_PROGRESS = "token_refresh_in_progress"
REFRESH_FAILED = "token_refresh_failed"
CALLBACK_PATH = "/oauth/callback"
DEFAULT_REDIRECT_PORT = 8765
TOKEN_ENDPOINT_TIMEOUT = (3.05, 5.0)   # connect, read: the refresh lock lasts their sum + 2 s

# Release the lock only if it is still ours (a lapsed lease may have been taken over).
_RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) else return 0 end")
# ... and extend it while it is ours (the refresh is still running).
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
          "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
# A token endpoint's refusal of the refresh token itself: RFC 6749's error, and HubSpot's
# own 400 body ({"status": "BAD_REFRESH_TOKEN", "message": …}).
REFUSED_GRANT = frozenset({"invalid_grant", "BAD_REFRESH_TOKEN"})


@dataclass(frozen=True)
class OAuthSettings:
    """One provider's OAuth2 client configuration (``OUTBOX_<NAME>_…``)."""

    provider: str
    client_id: str | None
    client_secret: ApiKey = field(repr=False)
    authorize_url: str
    token_url: str
    scopes: str
    redirect_port: int

    @property
    def redirect_uri(self) -> str:
        """Where the provider sends the browser back: a loopback listener (RFC 8252)."""
        return f"http://127.0.0.1:{self.redirect_port}{CALLBACK_PATH}"

    @classmethod
    def from_env(cls, provider: str, environ: Mapping[str, str] | None = None, *,
                 default_authorize_url: str, default_token_url: str,
                 default_scopes: str) -> OAuthSettings:
        """Read ``OUTBOX_<NAME>_CLIENT_ID``, ``_CLIENT_SECRET`` or ``_CLIENT_SECRET_FILE``,
        ``_AUTHORIZE_URL``, ``_TOKEN_URL``, ``_SCOPES`` and ``_REDIRECT_PORT``.

        Raises:
            ConfigurationError: a URL is not https (http only to loopback), both secret
                variables are set, or the port is not a number.
        """
        env = os.environ if environ is None else environ
        secret = get_str(env, env_name(provider, "CLIENT_SECRET"), None)
        secret_file = get_str(env, env_name(provider, "CLIENT_SECRET_FILE"), None)
        if secret and secret_file:
            raise ConfigurationError(f"set only one of {env_name(provider, 'CLIENT_SECRET')} "
                                     f"and {env_name(provider, 'CLIENT_SECRET_FILE')}")
        urls = {}
        for suffix, default in (("AUTHORIZE_URL", default_authorize_url),
                                ("TOKEN_URL", default_token_url)):
            url = get_str(env, env_name(provider, suffix), default)
            check_base_url(url, variable=env_name(provider, suffix))
            urls[suffix] = url
        port = get_int(env, env_name(provider, "REDIRECT_PORT"), DEFAULT_REDIRECT_PORT)
        if port > 65535:
            raise ConfigurationError(f"{env_name(provider, 'REDIRECT_PORT')} must be a port")
        return cls(
            provider=provider,
            client_id=get_str(env, env_name(provider, "CLIENT_ID"), None),
            client_secret=ApiKey(secret, secret_file,
                                 source=f"set {env_name(provider, 'CLIENT_SECRET')} or "
                                        f"{env_name(provider, 'CLIENT_SECRET_FILE')}",
                                 file_variable=env_name(provider, "CLIENT_SECRET_FILE"),
                                 what="client secret"),
            authorize_url=urls["AUTHORIZE_URL"], token_url=urls["TOKEN_URL"],
            scopes=get_str(env, env_name(provider, "SCOPES"), default_scopes),
            redirect_port=port)

    def session(self, **kwargs: Any) -> OAuth2Session:
        """An authlib session for this client: PKCE (S256), the secret in the form body (as
        HubSpot expects), TLS pinned and no proxy variables (``integrations.http``).

        Raises:
            CredentialUnavailable: no client id, or the secret cannot be read.
        """
        if not self.client_id:
            raise CredentialUnavailable(f"{env_name(self.provider, 'CLIENT_ID')} is not set",
                                        code="credential_unavailable",
                                        retry_after_s=REAUTHORIZE_RETRY_S)
        session = OAuth2Session(self.client_id, self.client_secret.get(),
                                token_endpoint_auth_method="client_secret_post",
                                scope=self.scopes, redirect_uri=self.redirect_uri,
                                code_challenge_method="S256", **kwargs)
        return pinned_session(session, 1)


@dataclass(frozen=True)
class Tokens:
    """A token endpoint's answer. ``repr`` never shows the tokens."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: datetime
    lifetime_s: float
    scope: str | None = None

    @classmethod
    def from_response(cls, token: Mapping[str, Any], now: datetime,
                      previous_refresh_token: str | None = None) -> Tokens:
        """Read an RFC 6749 token response (``expires_in`` seconds; a refresh answer without
        a ``refresh_token`` keeps the previous one).

        Without a usable ``expires_in`` the token is taken to live ``DEFAULT_LIFETIME_S``
        (refreshed early rather than used late).

        Raises:
            ValueError: no access token.
        """
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise ValueError("the token response has no access_token")
        try:   # RFC 6749 only recommends it; some servers send a string
            expires_in = float(token.get("expires_in"))
        except (TypeError, ValueError):
            expires_in = DEFAULT_LIFETIME_S
        if not 0 < expires_in < 10 * 365 * 86400:
            expires_in = DEFAULT_LIFETIME_S
        refresh = token.get("refresh_token") or previous_refresh_token
        scope = token.get("scope")
        return cls(access, refresh if isinstance(refresh, str) else None,
                   now + timedelta(seconds=expires_in), expires_in,
                   scope if isinstance(scope, str) else None)

    def refresh_due_at(self) -> datetime:
        """When ``REFRESH_AT`` of the lifetime has passed."""
        return self.expires_at - timedelta(seconds=(1 - REFRESH_AT) * self.lifetime_s)

    def margin_s(self) -> float:
        """No request is sent with this token in its last ``margin_s`` seconds."""
        return min(5.0, 0.1 * self.lifetime_s)

    def usable(self, now: datetime) -> bool:
        """Whether the token may still be sent (it is not within its margin of expiry)."""
        return now < self.expires_at - timedelta(seconds=self.margin_s())


ACTIVE, REVOKED = "active", "revoked"


@dataclass(frozen=True)
class Grant:
    """What the store holds for a provider, decrypted."""

    tokens: Tokens
    status: str
    detail: str | None
    version: int
    refresh_started_at: datetime | None = None


class GrantStore(Protocol):
    """Durable, shared storage of grants (``outbox.grants``). Every write is one transaction;
    a store that cannot be reached raises ``CredentialUnavailable`` (the message waits)."""

    def load(self, provider: str) -> Grant | None:
        """The provider's grant, decrypted; None when it was never connected."""

    def connect(self, provider: str, tokens: Tokens) -> None:
        """Store a new authorisation: replaces any grant, status active."""

    def mark_refresh(self, provider: str, version: int, started_at: datetime) -> None:
        """Mark a refresh of ``version`` in flight (cleared by ``save_refreshed``)."""

    def save_refreshed(self, provider: str, version: int, tokens: Tokens) -> bool:
        """Replace the tokens of ``version`` (and clear the in-flight mark); False when the
        grant moved on (another save, a new connect)."""

    def revoke(self, provider: str, version: int, detail: str) -> bool:
        """Mark ``version`` revoked with ``detail``; False when the grant moved on."""


_store_factory: Callable[[], GrantStore] | None = None


def use_grant_store(factory: Callable[[], GrantStore]) -> None:
    """Install where grants live (``outbox`` installs its database store when imported)."""
    global _store_factory
    _store_factory = factory


def grant_store() -> GrantStore:
    """The installed store.

    Raises:
        ConfigurationError: none is installed (``outbox`` was never imported).
    """
    if _store_factory is None:
        raise ConfigurationError("no OAuth grant store: import outbox to install its "
                                 "database store")
    return _store_factory()


def reauthorization_required(provider: str, why: str) -> CredentialUnavailable:
    """The deferral for a provider whose grant is missing or revoked."""
    return CredentialUnavailable(f"re-authorisation required: {why}; run outbox {provider} "
                                 "connect", code=REAUTHORIZATION_REQUIRED,
                                 retry_after_s=REAUTHORIZE_RETRY_S)


class OAuthCredential:
    """The ``Credential`` of an OAuth2 provider: ``get()`` answers a usable access token,
    refreshing it ahead of expiry (single-flight); ``refresh()`` after a 401."""

    def __init__(self, settings: OAuthSettings, store: GrantStore | None,
                 client: redis.Redis | None, *, now: Callable[[], datetime] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        """Args:
            settings: the client configuration.
            store: where grants live (default: the installed store, on first use).
            client: Redis for the refresh lock (None: a per-process lock only, for tests
                and single-process tools).
            now, sleep: injected for tests.
        """
        self.settings = settings
        self.provider = settings.provider
        self._store = store
        self._redis = client
        self._now = now or (lambda: datetime.now(UTC).replace(tzinfo=None))
        self._sleep = sleep
        self._local = threading.Lock()   # one refresh at a time within this process too
        self._cached: tuple[Grant, float] | None = None   # the grant, read at (monotonic)
        self._handed = threading.local()   # the grant whose token this thread last got
        self._unsaved: tuple[int, Tokens] | None = None   # a refreshed pair not yet saved
        self._failed_at = float("-inf")   # when this process's last refresh failed
        self._lock_key = f"outbox:{self.provider}:oauth-refresh"
        self.lock_s = sum(TOKEN_ENDPOINT_TIMEOUT) + 2.0   # renewed while the refresh runs

    @property
    def store(self) -> GrantStore:
        if self._store is None:
            self._store = grant_store()
        return self._store

    def get(self) -> str:
        """A usable access token.

        Raises:
            CredentialUnavailable: never connected or revoked (``reauthorization_required``),
                the client is not configured, or the token expires and no refresh could
                give a new one now (``token_refresh_in_progress``/``token_refresh_failed``).
        """
        cached = self._cached
        if cached is not None and time.monotonic() - cached[1] < GRANT_CACHE_S \
                and not self._due(cached[0]):
            grant = cached[0]
        else:   # re-read now and then: another process may have refreshed or been refused
            grant = self._load()
            if self._due(grant):
                grant = self._refresh_due(grant)
            self._cached = (grant, time.monotonic())
        if not grant.tokens.usable(self._now()):
            raise Deferred(f"{self.provider} access token expires and is not refreshed yet",
                           code=REFRESH_IN_PROGRESS, retry_after_s=REFRESH_FAILED_RETRY_S)
        self._handed.grant = grant
        return grant.tokens.access_token

    def refresh(self) -> None:
        """After a 401: re-read the grant, and refresh it unless it was replaced since this
        thread's refused token was handed out (another thread or worker refreshed).

        Raises:
            CredentialUnavailable: as ``get``; ``Deferred`` (``token_refresh_failed``) when
                the refresh fails: sending the refused token again would only be refused.
        """
        refused = getattr(self._handed, "grant", None)
        self._cached = None
        grant = self._load()
        if refused is not None and grant.version != refused.version:
            return   # already replaced: get() answers the new token
        self._refresh_due(grant, force=True)

    def check(self) -> list[str]:
        """Whether this provider can get tokens now (health, worker start-up). A provider
        whose client id is not set is not in use: nothing to check (its messages, if any,
        wait; the queue's depth and age say so).

        Raises:
            CredentialUnavailable: the client secret cannot be read, or the grant is missing
                or revoked (``reauthorization_required``) or cannot be decrypted.
        """
        if not self.settings.client_id:
            return []
        self.settings.client_secret.get()
        self._load()
        return []

    # --- internals ----------------------------------------------------------------------

    def _due(self, grant: Grant) -> bool:
        """Whether ``grant`` is to be refreshed now: 80 % of its token's life has passed, or
        a refresh of it never finished (its old refresh token must be redeemed again while
        the server's grace window lasts)."""
        return (grant.refresh_started_at is not None
                or self._now() >= grant.tokens.refresh_due_at())

    def _load(self) -> Grant:
        try:
            grant = self.store.load(self.provider)
        except ConfigurationError as exc:   # no key, or none that decrypts the grant
            raise CredentialUnavailable(str(exc), code="credential_unavailable",
                                        retry_after_s=REAUTHORIZE_RETRY_S) from None
        if grant is None:
            raise reauthorization_required(self.provider, f"{self.provider} is not connected")
        if grant.status != ACTIVE:
            raise reauthorization_required(self.provider, grant.detail or "the grant was revoked")
        return grant

    def _refresh_due(self, grant: Grant, *, force: bool = False) -> Grant:
        """Refresh ``grant`` if this worker takes the lock; else use it while it is usable,
        or wait for the worker that refreshes. After a failed refresh, a usable token is
        used for ``REFRESH_FAILED_RETRY_S`` before the token endpoint is asked again."""
        backing_off = time.monotonic() - self._failed_at < REFRESH_FAILED_RETRY_S
        if backing_off and not force and grant.tokens.usable(self._now()):
            return grant
        if self._local.acquire(blocking=False):   # else a thread of ours refreshes
            try:
                release = self._take_lock()
                if release is not None:
                    try:
                        current = self._load()   # re-read under the lock: refreshed meanwhile?
                        if current.version != grant.version or not (force or self._due(current)):
                            return current
                        return self._refresh(current, force)
                    finally:
                        release()
            finally:
                self._local.release()
        if grant.tokens.usable(self._now()) and not force:
            return grant   # another worker refreshes; this token has time left
        deadline = time.monotonic() + WAIT_FOR_REFRESH_S
        while time.monotonic() < deadline:
            self._sleep(0.1)
            current = self._load()
            if current.version != grant.version:
                return current
        raise Deferred(f"{self.provider} token refresh is taking long (another worker holds "
                       "it)", code=REFRESH_IN_PROGRESS, retry_after_s=REFRESH_FAILED_RETRY_S)

    def _refresh(self, grant: Grant, force: bool) -> Grant:
        """Redeem ``grant``'s refresh token (under the lock) and save the new pair; an
        answer received but not saved (the database failed) is saved, not redeemed again."""
        if self._unsaved is not None and self._unsaved[0] == grant.version:
            return self._save(grant, self._unsaved[1])
        if grant.tokens.refresh_token is None:
            raise self._revoked(grant, "the grant has no refresh token")
        if grant.refresh_started_at is not None:
            log.warning("%s: a token refresh started at %s did not finish (its worker died, "
                        "or the token endpoint failed); redeeming the same refresh token "
                        "again", self.provider,
                        grant.refresh_started_at.isoformat(timespec="seconds"),
                        extra={"provider": self.provider})
        sent_at = self._now()   # the token's life starts before the request, not after
        self.store.mark_refresh(self.provider, grant.version, sent_at)
        try:
            session = self.settings.session()
            session.register_compliance_hook("refresh_token_response", _refusal)
            answer = session.refresh_token(
                self.settings.token_url, refresh_token=grant.tokens.refresh_token,
                timeout=TOKEN_ENDPOINT_TIMEOUT, allow_redirects=False)
            tokens = Tokens.from_response(answer, sent_at, grant.tokens.refresh_token)
        except AuthlibBaseError as exc:
            if exc.error in REFUSED_GRANT:
                raise self._revoked(grant, "the provider refused the refresh token "
                                           f"({exc.error}: revoked or expired)") from None
            return self._failed(grant, f"token endpoint answered "
                                       f"{sanitize(str(exc.error), 60)}", force)
        except Exception as exc:   # noqa: BLE001  (requests, a malformed answer, authlib)
            return self._failed(grant, f"token endpoint failed ({type(exc).__name__})", force)
        return self._save(grant, tokens)

    def _save(self, grant: Grant, tokens: Tokens) -> Grant:
        try:
            saved = self.store.save_refreshed(self.provider, grant.version, tokens)
        except CredentialUnavailable:
            self._unsaved = (grant.version, tokens)   # the only copy of the new refresh token
            raise
        self._unsaved = None
        if not saved:
            log.warning("%s: the grant changed while refreshing; keeping the stored one",
                        self.provider, extra={"provider": self.provider})
            return self._load()
        log.info("%s: access token refreshed (valid %.0f s)", self.provider, tokens.lifetime_s,
                 extra={"provider": self.provider})
        return replace(grant, tokens=tokens, version=grant.version + 1,
                       refresh_started_at=None)

    def _failed(self, grant: Grant, why: str, force: bool) -> Grant:
        """The refresh failed for now (nothing was rotated, or the answer was lost: the
        mark stays then, so the next refresh redeems the same token in the grace window):
        keep using the token while it lasts, unless it was just refused (``force``)."""
        self._failed_at = time.monotonic()
        log.warning("%s: %s; will try again", self.provider, why,
                    extra={"provider": self.provider})
        if grant.tokens.usable(self._now()) and not force:
            return grant
        raise Deferred(f"{self.provider} {why}", code=REFRESH_FAILED,
                       retry_after_s=REFRESH_FAILED_RETRY_S)

    def _revoked(self, grant: Grant, why: str) -> CredentialUnavailable:
        self.store.revoke(self.provider, grant.version, why)
        self._cached = None
        log.error("%s: %s; re-authorisation required (outbox %s connect)", self.provider,
                  why, self.provider, extra={"provider": self.provider})
        return reauthorization_required(self.provider, why)

    def _take_lock(self) -> Callable[[], None] | None:
        """The fleet-wide refresh lock: returns its release (call it once), or None when
        another worker holds it. A thread renews the lease every third of it until then: a
        refresh slower than the lease (DNS, several addresses to try) keeps the lock, and a
        worker that dies stops renewing, so its lock lapses within ``lock_s``."""
        if self._redis is None:
            return lambda: None
        client, key = self._redis, self._lock_key
        token, lease_ms = uuid.uuid4().hex, int(self.lock_s * 1000)
        try:
            taken = client.set(key, token, nx=True, px=lease_ms)
        except redis.RedisError as exc:
            raise Deferred(f"{self.provider} refresh lock unavailable (Redis: "
                           f"{type(exc).__name__})", code="protection_unavailable",
                           retry_after_s=5.0) from exc
        if not taken:
            return None
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lock_s / 3):
                try:
                    client.eval(_RENEW, 1, key, token, lease_ms)
                except Exception:  # noqa: BLE001  (Redis away or closed: the lease lapses)
                    return
        threading.Thread(target=renew, name=f"{self.provider}-refresh-lock", daemon=True).start()

        def release() -> None:
            done.set()
            try:
                client.eval(_RELEASE, 1, key, token)
            except redis.RedisError:
                pass   # the lease lapses by itself
        return release

    def __repr__(self) -> str:
        return f"OAuthCredential({self.provider})"


KEEP_FRESH_S = 5.0   # how often the relay looks at every OAuth2 grant


def keep_fresh(credentials: Callable[[], Iterable[OAuthCredential]], stop: threading.Event,
               interval_s: float = KEEP_FRESH_S) -> threading.Thread:
    """Refresh grants when they are due without waiting for a message to need them, in a
    daemon thread (the relay runs it): a grant whose refresh was interrupted (a worker killed
    after the token endpoint rotated it) is redeemed again within seconds, inside the
    server's grace window, even when no crm message is being sent. Never raises; a grant
    that cannot be refreshed is health's to report."""
    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                found = list(credentials())
            except Exception as exc:  # noqa: BLE001  (bad settings: outbox status says which)
                log.warning("OAuth grants not checked (%s)", type(exc).__name__)
                continue
            for credential in found:
                if not credential.settings.client_id:
                    continue   # not in use
                try:
                    credential.get()
                except IntegrationError as exc:
                    log.debug("%s: %s", credential.provider, exc.label())
                except Exception as exc:  # noqa: BLE001  (Redis down, a bug: next round)
                    log.warning("%s: grant not refreshed (%s)", credential.provider,
                                type(exc).__name__)
    thread = threading.Thread(target=loop, name="outbox-oauth-keep-fresh", daemon=True)
    thread.start()
    return thread


def _refusal(response: requests.Response) -> requests.Response:
    """authlib raises only for an RFC 6749 ``error`` body: a 4xx refusing the grant in the
    provider's own shape (HubSpot: ``{"status": "BAD_REFRESH_TOKEN"}``) is made one."""
    if 400 <= response.status_code < 500:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" not in body and body.get("status") in REFUSED_GRANT:
            raise OAuthError(error=body["status"])
    return response


# --- the authorisation-code flow (``outbox <provider> connect``) ---------------------------

@dataclass(frozen=True)
class Authorization:
    """A started authorisation: the URL to open, and what the callback is checked against."""

    url: str
    state: str = field(repr=False)
    code_verifier: str = field(repr=False)


def start_authorization(settings: OAuthSettings) -> Authorization:
    """The authorize URL with a random ``state`` and a PKCE S256 challenge."""
    state, verifier = generate_token(32), generate_token(64)
    url, _ = settings.session().create_authorization_url(
        settings.authorize_url, state=state, code_verifier=verifier)
    return Authorization(url, state, verifier)


def finish_authorization(settings: OAuthSettings, started: Authorization,
                         callback_url: str, now: datetime) -> Tokens:
    """Check the callback's ``state`` and exchange its code (with the PKCE verifier).

    Raises:
        ValueError: the callback carries an error, a wrong ``state`` or no code, or the
            token endpoint refused the code or failed (one line, no token in it).
    """
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(callback_url).query))
    if not hmac.compare_digest(params.get("state", "").encode(), started.state.encode()):
        raise ValueError("the callback's state does not match this authorisation (a "
                         "forged or stale redirect): start again")
    if "error" in params:
        raise ValueError(f"authorisation refused: {sanitize(params['error'], 60)}"
                         + (f" ({sanitize(params['error_description'], 160)})"
                            if params.get("error_description") else ""))
    if not params.get("code"):
        raise ValueError("the callback carries no authorisation code")
    session = settings.session(state=started.state)
    try:
        answer = session.fetch_token(settings.token_url, authorization_response=callback_url,
                                     code_verifier=started.code_verifier,
                                     timeout=TOKEN_ENDPOINT_TIMEOUT, allow_redirects=False)
    except AuthlibBaseError as exc:
        raise ValueError(f"the token endpoint refused the code: {sanitize(exc.error or '', 60)}"
                         + (f" ({sanitize(exc.description, 160)})" if exc.description
                            else "")) from None
    except requests.RequestException as exc:
        raise ValueError(f"token endpoint failed ({type(exc).__name__})") from None
    return Tokens.from_response(answer, now)


class CallbackListener:
    """The loopback redirect target of ``outbox <provider> connect`` (RFC 8252): listens on
    127.0.0.1 from construction (before the URL is shown), and ``wait`` returns the first
    callback's full URL. Nothing it receives is logged (the URL carries the code)."""

    def __init__(self, port: int):
        """Raises: OSError: the port cannot be bound."""
        received: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            timeout = 5   # a connection that sends nothing (a browser's preconnect) is dropped

            def do_GET(self) -> None:  # noqa: N802
                if self.path.partition("?")[0] != CALLBACK_PATH:
                    self.send_error(404)
                    return
                received.append(f"http://127.0.0.1:{port}{self.path}")
                body = (b"<!doctype html><title>integration-outbox</title><p>Received. You "
                        b"can close this tab; the terminal says whether it worked.</p>")
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._received = received
        self._server = HTTPServer(("127.0.0.1", port), Handler)
        self._server.timeout = 0.2

    def wait(self, timeout_s: float) -> str:
        """The callback URL. Raises TimeoutError when none came within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self._received and time.monotonic() < deadline:
            self._server.handle_request()
        if not self._received:
            raise TimeoutError(f"no callback within {timeout_s:g} s")
        return self._received[0]

    def close(self) -> None:
        self._server.server_close()

    def __enter__(self) -> CallbackListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
