"""HubSpot-shaped OAuth 2.0 authorization server: the code flow with PKCE and rotating
refresh tokens, for the CRM API (``sandbox.crm`` serves both over HTTP).

There is no user: ``GET /oauth/authorize`` approves at once (or denies, when the
``crm_deny_authorization`` switch is on) and redirects back to a loopback ``redirect_uri``.
PKCE (S256) and ``state`` are required, so a client that forgets either fails here
rather than in production.

``POST /oauth/v1/token`` rotates refresh tokens. The one just redeemed may be presented
again within ``crm_refresh_grace_s`` and gets the identical answer (a client that crashed
before saving the new pair recovers, as Okta's grace period and Auth0's reuse interval
allow); any other reuse of a redeemed refresh token, or a second use of a code, revokes
every token of that authorization (RFC 6749 §4.1.2, RFC 6819 §5.2.2.3).

Replies are ``(status, body, headers)`` tuples: this module sits under ``SandboxState`` and
must not import the endpoint modules, which import the state.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_plus, urlencode, urlsplit

PREFIX = "/oauth/"
AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_PATH = "/oauth/v1/token"
DEFAULT_CLIENT_ID = "outbox-demo-client"
DEFAULT_CLIENT_SECRET = "outbox-demo-secret-0123456789"
DEFAULT_ACCESS_TOKEN_TTL_S = 1800   # HubSpot's
DEFAULT_REFRESH_GRACE_S = 30
DEFAULT_AUTH_CODE_TTL_S = 600
GRANT_TYPES = ("authorization_code", "refresh_token")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")   # BASE64URL-NOPAD of 32 bytes
_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")   # RFC 7636 §4.1

SETTINGS = ("crm_client_id", "crm_client_secret", "crm_access_token_ttl_s",
            "crm_refresh_grace_s", "crm_auth_code_ttl_s", "crm_deny_authorization")

Reply = tuple[int, dict | None, dict[str, str]]


@dataclass
class _Grant:
    """One authorization: every token issued from one code is revoked together."""

    client_id: str
    scope: str
    revoked: bool = False
    latest_refresh: str = ""   # the one refresh token of the family not yet redeemed


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str
    expires_at: float
    used: bool = False
    grant: _Grant | None = None   # what its redemption created; a second use revokes it


@dataclass
class _Refresh:
    grant: _Grant
    redeemed_at: float | None = None
    answer: dict | None = None   # the response its redemption gave, replayed within grace


@dataclass
class _Access:
    grant: _Grant
    expires_at: float


def parse_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Validate the ``crm_*`` keys of a ``POST /_sandbox/config`` body; raises ValueError."""
    client_id, secret = data.get("crm_client_id"), data.get("crm_client_secret")
    # A ':' would split HTTP Basic credentials in the wrong place for many clients.
    if client_id is not None and not (isinstance(client_id, str) and client_id.strip()
                                      and ":" not in client_id):
        raise ValueError("crm_client_id must be a non-empty string without ':'")
    if secret is not None and not (isinstance(secret, str) and secret.strip()):
        raise ValueError("crm_client_secret must be a non-empty string")
    for name, top in (("crm_access_token_ttl_s", 86400), ("crm_auth_code_ttl_s", 3600)):
        value = data.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 1 <= value <= top):
            raise ValueError(f"{name} must be an integer from 1 to {top}")
    grace = data.get("crm_refresh_grace_s")
    if grace is not None and (not isinstance(grace, int | float) or isinstance(grace, bool)
                              or not 0 <= grace <= 3600):
        raise ValueError("crm_refresh_grace_s must be a number of seconds from 0 to 3600")
    deny = data.get("crm_deny_authorization")
    if deny is not None and not isinstance(deny, bool):
        raise ValueError("crm_deny_authorization must be true or false")
    return {k: v for k, v in data.items() if v is not None}


def s256(verifier: str) -> str:
    """RFC 7636's S256 code challenge: BASE64URL-NOPAD(SHA256(ASCII(verifier)))."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _loopback_redirect(uri: str) -> bool:
    """True for ``http://`` to a loopback host with an explicit port, no user, no fragment."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return False
    return (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS and port is not None
            and parts.username is None and "#" not in uri)


def _redirect(uri: str, params: dict[str, str]) -> Reply:
    """302 to ``uri`` with ``params`` added to its query (after any it already has)."""
    sep = "" if uri.endswith(("?", "&")) else "&" if "?" in uri else "?"
    location = uri + sep + urlencode(params, quote_via=quote, safe="")
    return 302, None, {"Location": location, **NO_STORE}


def _page(error: str, description: str) -> Reply:
    """A 400 shown to the user instead of a redirect (the redirect target is not trusted)."""
    return 400, {"error": error, "error_description": description}, dict(NO_STORE)


def _error(status: int, error: str, description: str) -> Reply:
    headers = dict(NO_STORE)
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="sandbox"'
    return status, {"error": error, "error_description": description}, headers


class OAuthState:
    """Client settings, codes, grants and tokens; every method takes the sandbox's lock."""

    def __init__(self, lock, clock: Callable[[], float], client_id: str,
                 client_secret: str) -> None:
        """Share ``lock`` and ``clock`` (the sandbox clock, which tests can move) with the state."""
        self._lock, self._clock = lock, clock
        self.client_id, self.client_secret = client_id, client_secret
        self.reset()

    def reset(self) -> None:
        """Forget every code, grant, token and count; settings back to defaults but the client."""
        with self._lock:
            self.access_token_ttl_s = DEFAULT_ACCESS_TOKEN_TTL_S
            self.refresh_grace_s: float = DEFAULT_REFRESH_GRACE_S
            self.auth_code_ttl_s = DEFAULT_AUTH_CODE_TTL_S
            self.deny_authorization = False
            self._codes: dict[str, _Code] = {}
            self._grants: list[_Grant] = []
            self._refresh: dict[str, _Refresh] = {}
            self._access: dict[str, _Access] = {}
            self.token_requests = collections.Counter(dict.fromkeys((*GRANT_TYPES, "other"), 0))
            self.counts = collections.Counter()

    def configure(self, settings: dict[str, Any]) -> None:
        """Apply settings already checked by ``parse_settings``."""
        with self._lock:
            self.client_id = settings.get("crm_client_id", self.client_id)
            self.client_secret = settings.get("crm_client_secret", self.client_secret)
            self.access_token_ttl_s = settings.get("crm_access_token_ttl_s",
                                                   self.access_token_ttl_s)
            self.refresh_grace_s = settings.get("crm_refresh_grace_s", self.refresh_grace_s)
            self.auth_code_ttl_s = settings.get("crm_auth_code_ttl_s", self.auth_code_ttl_s)
            self.deny_authorization = settings.get("crm_deny_authorization",
                                                   self.deny_authorization)

    def settings(self) -> dict[str, Any]:
        """The settings for ``GET /_sandbox/config``, without the client secret."""
        with self._lock:
            return {"crm_client_id": self.client_id,
                    "crm_access_token_ttl_s": self.access_token_ttl_s,
                    "crm_refresh_grace_s": self.refresh_grace_s,
                    "crm_auth_code_ttl_s": self.auth_code_ttl_s,
                    "crm_deny_authorization": self.deny_authorization}

    def stats(self) -> dict[str, Any]:
        """Counts only: no token and no secret ever appears here."""
        with self._lock:
            return {"token_requests": dict(self.token_requests),
                    **{name: self.counts[name] for name in (
                        "refreshes", "refresh_replays", "refresh_reuse_detected",
                        "requests_with_expired_token", "requests_with_revoked_token",
                        "authorizations")}}

    # --- authorization endpoint ----------------------------------------------

    def authorize(self, query: str) -> Reply:
        """``GET /oauth/authorize``: approve at once, redirecting with a code (or an error)."""
        pairs = parse_qsl(query, keep_blank_values=True)
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        params = dict(pairs)
        redirect_uri = params.get("redirect_uri", "")
        with self._lock:
            if "client_id" in repeated or params.get("client_id") != self.client_id:
                return _page("invalid_request", "unknown client_id")
            if "redirect_uri" in repeated or not _loopback_redirect(redirect_uri):
                return _page("invalid_request", "redirect_uri must be http:// to 127.0.0.1, "
                                                "localhost or [::1] with a port")
            if params.get("response_type") != "code":
                return _page("unsupported_response_type", "response_type must be code")
            state = params.get("state", "")
            echo = {"state": state} if state else {}
            problem = ("state is required" if not state
                       else f"parameters given more than once: {repeated}" if repeated
                       else "code_challenge is required (PKCE)"
                       if not params.get("code_challenge")
                       else "code_challenge_method must be S256"
                       if params.get("code_challenge_method") != "S256"
                       else "code_challenge must be 43 base64url characters"
                       if not _CHALLENGE.match(params["code_challenge"]) else None)
            if problem:
                return _redirect(redirect_uri, {"error": "invalid_request",
                                                "error_description": problem, **echo})
            if self.deny_authorization:
                return _redirect(redirect_uri, {"error": "access_denied", "error_description":
                                                "the user denied the request", **echo})
            code = secrets.token_urlsafe(32)
            self._codes[code] = _Code(self.client_id, redirect_uri, params["code_challenge"],
                                      params.get("scope", ""),
                                      self._clock() + self.auth_code_ttl_s)
            self.counts["authorizations"] += 1
            return _redirect(redirect_uri, {"code": code, **echo})

    # --- token endpoint ---------------------------------------------------------

    def token(self, authorization: str, content_type: str, body: bytes) -> Reply:
        """``POST /oauth/v1/token``: redeem a code or a refresh token."""
        if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            return _error(400, "invalid_request",
                          "the body must be application/x-www-form-urlencoded")
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return _error(400, "invalid_request", "the body is not UTF-8")
        form = dict(pairs)
        grant_type = form.get("grant_type", "")
        with self._lock:
            self.token_requests[grant_type if grant_type in GRANT_TYPES else "other"] += 1
            if len(form) != len(pairs):
                return _error(400, "invalid_request", "a parameter is given more than once")
            client = self._client(authorization, form)
            if not isinstance(client, str):
                return client
            if not grant_type:
                return _error(400, "invalid_request", "grant_type is required")
            if grant_type == "authorization_code":
                return self._redeem_code(client, form)
            if grant_type == "refresh_token":
                return self._redeem_refresh(client, form)
            return _error(400, "unsupported_grant_type",
                          "grant_type must be authorization_code or refresh_token")

    def _client(self, authorization: str, form: dict[str, str]) -> str | Reply:
        """The authenticated client id (client_secret_basic or client_secret_post), or a 401."""
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "basic":
            if "client_secret" in form:
                return _error(400, "invalid_request", "use one client authentication method")
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return _error(401, "invalid_client", "malformed Basic credentials")
            raw_id, _, raw_secret = decoded.partition(":")
            # RFC 6749 §2.3.1: both are form-encoded before Basic encoding.
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if form.get("client_id", client_id) != client_id:
                return _error(401, "invalid_client", "client_id differs from the Basic one")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if not (client_id and secret):
            return _error(401, "invalid_client", "client authentication is required")
        if not (hmac.compare_digest(client_id.encode(), self.client_id.encode())
                and hmac.compare_digest(secret.encode(), self.client_secret.encode())):
            return _error(401, "invalid_client", "unknown client or wrong client secret")
        return client_id

    def _redeem_code(self, client: str, form: dict[str, str]) -> Reply:
        code, redirect_uri = form.get("code"), form.get("redirect_uri")
        verifier = form.get("code_verifier")
        if not (code and redirect_uri and verifier):
            return _error(400, "invalid_request",
                          "code, redirect_uri and code_verifier are required")
        entry = self._codes.get(code)
        if entry is None or entry.client_id != client:
            return _error(400, "invalid_grant", "unknown authorization code")
        if entry.used:
            if entry.grant is not None:
                entry.grant.revoked = True
            return _error(400, "invalid_grant",
                          "authorization code already used; its tokens are revoked")
        entry.used = True   # single use, whatever the outcome
        if self._clock() >= entry.expires_at:
            return _error(400, "invalid_grant", "authorization code expired")
        if redirect_uri != entry.redirect_uri:
            return _error(400, "invalid_grant",
                          "redirect_uri differs from the authorization request's")
        if not _VERIFIER.match(verifier) or not hmac.compare_digest(s256(verifier),
                                                                     entry.challenge):
            return _error(400, "invalid_grant", "code_verifier does not match code_challenge")
        entry.grant = _Grant(client, entry.scope)
        self._grants.append(entry.grant)
        return 200, self._issue(entry.grant), dict(NO_STORE)

    def _redeem_refresh(self, client: str, form: dict[str, str]) -> Reply:
        token = form.get("refresh_token")
        if not token:
            return _error(400, "invalid_request", "refresh_token is required")
        entry = self._refresh.get(token)
        if entry is None or entry.grant.client_id != client:
            return _error(400, "invalid_grant", "unknown refresh token")
        grant = entry.grant
        if grant.revoked:
            return _error(400, "invalid_grant", "refresh token revoked")
        if entry.redeemed_at is not None:
            latest = entry.answer["refresh_token"] == grant.latest_refresh
            if latest and self._clock() - entry.redeemed_at < self.refresh_grace_s:
                self.counts["refresh_replays"] += 1
                return 200, dict(entry.answer), dict(NO_STORE)
            grant.revoked = True
            self.counts["refresh_reuse_detected"] += 1
            return _error(400, "invalid_grant", "refresh token reuse detected")
        scope = form.get("scope")
        if scope is not None and not set(scope.split()) <= set(grant.scope.split()):
            return _error(400, "invalid_scope", "scope exceeds the one originally granted")
        entry.redeemed_at = self._clock()
        entry.answer = self._issue(grant)
        self.counts["refreshes"] += 1
        return 200, dict(entry.answer), dict(NO_STORE)

    def _issue(self, grant: _Grant) -> dict[str, Any]:
        access = "sbx-at-" + secrets.token_urlsafe(32)
        refresh = "sbx-rt-" + secrets.token_urlsafe(32)
        self._access[access] = _Access(grant, self._clock() + self.access_token_ttl_s)
        self._refresh[refresh] = _Refresh(grant)
        grant.latest_refresh = refresh
        return {"token_type": "bearer", "access_token": access, "refresh_token": refresh,
                "expires_in": self.access_token_ttl_s, "scope": grant.scope}

    # --- resource server side ---------------------------------------------------------

    def check_access(self, token: str) -> tuple[str, float]:
        """Classify a presented access token: ("valid" | "unknown" | "revoked" | "expired",
        seconds since it expired). Revoked and expired ones are counted: a correct client
        refreshes before expiry and stops using a revoked grant."""
        with self._lock:
            entry = self._access.get(token)
            if entry is None:
                return "unknown", 0.0
            if entry.grant.revoked:
                self.counts["requests_with_revoked_token"] += 1
                return "revoked", 0.0
            late = self._clock() - entry.expires_at
            if late >= 0:
                self.counts["requests_with_expired_token"] += 1
                return "expired", late
            return "valid", 0.0

    def revoke_all(self) -> int:
        """Revoke every grant (all their tokens); returns how many were still live."""
        with self._lock:
            live = [g for g in self._grants if not g.revoked]
            for grant in live:
                grant.revoked = True
            return len(live)
