"""Who may use the admin app: ``OUTBOX_WEB_AUTH=user:password`` (pages, and the API by
HTTP Basic) and ``OUTBOX_WEB_TOKEN`` (the API by ``Authorization: Bearer``, for scripts).

Pages keep the login in a signed session cookie (Starlette's ``SessionMiddleware``,
itsdangerous; ``HttpOnly``, ``SameSite=Strict``). Every state-changing form carries the
session's CSRF token, compared in constant time; the API takes no cookie at all, so a
page elsewhere cannot make a logged-in browser call it. The cookie signing key is
``OUTBOX_SECRET_KEY`` (or ``_FILE``) when set, else random per start (logins then end
with the process).
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from integrations.errors import ConfigurationError
from integrations.secretbox import configured_keys

MIN_PASSWORD = 12
MIN_TOKEN = 24


@dataclass(frozen=True)
class WebAuth:
    user: str
    password: str
    token: str | None
    secret_key: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebAuth:
        """Raises ConfigurationError, naming the variable, when the credentials are
        missing or weak."""
        env = os.environ if environ is None else environ
        raw = env.get("OUTBOX_WEB_AUTH", "")
        user, sep, password = raw.partition(":")
        if not raw or not sep or not user:
            raise ConfigurationError("OUTBOX_WEB_AUTH=user:password is required: the admin "
                                     "app never runs without a login")
        if len(password) < MIN_PASSWORD:
            raise ConfigurationError(f"OUTBOX_WEB_AUTH: the password must have at least "
                                     f"{MIN_PASSWORD} characters")
        token = env.get("OUTBOX_WEB_TOKEN") or None
        if token is not None and len(token) < MIN_TOKEN:
            raise ConfigurationError(f"OUTBOX_WEB_TOKEN must have at least {MIN_TOKEN} "
                                     "characters")
        return cls(user, password, token, _secret_key(env))

    def check_password(self, user: str, password: str) -> bool:
        """Both compared in constant time (and both always compared)."""
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        ok_password = hmac.compare_digest(password.encode(), self.password.encode())
        return ok_user and ok_password

    def api_actor(self, authorization: str | None) -> str | None:
        """The actor an ``Authorization`` header proves (the user, or ``token``), or None."""
        scheme, _, value = (authorization or "").partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.token is not None:
            return "token" if hmac.compare_digest(value.strip().encode(),
                                                   self.token.encode()) else None
        if scheme == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True) \
                    .decode().partition(":")
            except ValueError:   # not base64 (binascii.Error), not ASCII, not UTF-8
                return None
            return user if self.check_password(user, password) else None
        return None


def _secret_key(env: Mapping[str, str]) -> str:
    # The first key of OUTBOX_SECRET_KEY (a Fernet rotation list: integrations.secretbox).
    keys = configured_keys(env)
    return keys[0] if keys else secrets.token_urlsafe(32)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(expected.encode(),
                                                                   given.encode())
