"""Per-provider settings, read once from the environment through typed helpers that fail loudly.

Variables for provider ``NAME`` (upper case)::

    OUTBOX_<NAME>_BASE_URL          https://...; http:// only for loopback hosts
    OUTBOX_<NAME>_TIMEOUT           read timeout, seconds, float > 0       (default 10)
    OUTBOX_<NAME>_CONNECT_TIMEOUT   connect timeout, seconds, float > 0    (default 3.05)
    OUTBOX_<NAME>_MAX_CONCURRENCY   HTTP connection pool size, int >= 1    (default 10); when
                                    set, also the global cap on calls in flight
    OUTBOX_<NAME>_API_KEY           the key itself, or
    OUTBOX_<NAME>_API_KEY_FILE      a file holding it (re-read when it changes)

Rate limits, quotas, the concurrency cap and the circuit breaker have their own variables,
read by ``integrations.protection.settings``.

Every error is a ``ConfigurationError`` whose message names the variable and never quotes
a credential.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from integrations.errors import ConfigurationError

DEFAULT_BASE_URLS: dict[str, str] = {
    "payments": "https://api.stripe.com",
    "email": "https://api.sendgrid.com",
    "crm": "https://api.hubapi.com",
}
DEFAULT_READ_TIMEOUT_S = 10.0
# Slightly above a multiple of 3 s, the TCP retransmission window (requests' own advice).
DEFAULT_CONNECT_TIMEOUT_S = 3.05
DEFAULT_MAX_CONCURRENCY = 10

_PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ProviderSettings:
    """Connection policy for one provider. ``repr`` never shows ``api_key``.

    Attributes:
        name: provider name (``payments``).
        base_url: scheme and host (and optional path prefix), no trailing slash; None for a
            provider without one (its requests carry their own URL: webhooks).
        read_timeout_s: seconds to wait for response bytes once the request is sent.
        connect_timeout_s: seconds to wait for the TCP/TLS connection.
        max_concurrency: HTTP connection pool size; match the worker concurrency.
        api_key: the key from ``OUTBOX_<NAME>_API_KEY``, or None.
        api_key_file: the path from ``OUTBOX_<NAME>_API_KEY_FILE``, or None.
    """

    name: str
    base_url: str | None
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    api_key: str | None = field(default=None, repr=False)
    api_key_file: Path | None = None

    def __post_init__(self) -> None:
        if self.base_url is not None:
            check_base_url(self.base_url, variable=env_name(self.name, "BASE_URL"))

    @property
    def timeout(self) -> tuple[float, float]:
        """``(connect, read)`` seconds, the shape ``requests`` takes."""
        return (self.connect_timeout_s, self.read_timeout_s)

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str] | None = None, *,
                 has_base_url: bool = True) -> ProviderSettings:
        """Read the settings of provider ``name`` from ``environ`` (default ``os.environ``).

        Args:
            has_base_url: False for a provider without a base URL (the adapter's
                ``has_base_url``): ``OUTBOX_<NAME>_BASE_URL`` is then not read.

        Raises:
            ConfigurationError: a value is malformed or out of range, the base URL is
                plain http to a non-loopback host, both API key variables are set, or the
                provider has no default base URL and none is configured.
        """
        if not _PROVIDER_NAME.match(name):
            raise ConfigurationError(f"invalid provider name {name!r}")
        env = os.environ if environ is None else environ
        base_url = (get_str(env, env_name(name, "BASE_URL"), DEFAULT_BASE_URLS.get(name))
                    if has_base_url else None)
        if base_url is None and has_base_url:
            raise ConfigurationError(f"{env_name(name, 'BASE_URL')} is required for provider {name!r}")
        api_key = get_str(env, env_name(name, "API_KEY"), None)
        key_file = get_str(env, env_name(name, "API_KEY_FILE"), None)
        if api_key is not None and key_file is not None:
            raise ConfigurationError(
                f"set only one of {env_name(name, 'API_KEY')} and {env_name(name, 'API_KEY_FILE')}")
        return cls(
            name=name,
            base_url=base_url.rstrip("/") if base_url is not None else None,
            read_timeout_s=get_float(env, env_name(name, "TIMEOUT"), DEFAULT_READ_TIMEOUT_S),
            connect_timeout_s=get_float(env, env_name(name, "CONNECT_TIMEOUT"),
                                        DEFAULT_CONNECT_TIMEOUT_S),
            max_concurrency=get_int(env, env_name(name, "MAX_CONCURRENCY"), DEFAULT_MAX_CONCURRENCY),
            api_key=api_key,
            api_key_file=Path(key_file) if key_file is not None else None,
        )


def env_name(provider: str, suffix: str) -> str:
    """``env_name("payments", "TIMEOUT")`` → ``"OUTBOX_PAYMENTS_TIMEOUT"``."""
    return f"OUTBOX_{provider.upper()}_{suffix}"


def get_str(env: Mapping[str, str], variable: str, default: str | None) -> str | None:
    """Return ``env[variable]`` stripped, or ``default`` when unset or blank."""
    value = env.get(variable, "").strip()
    return value or default


def secret_values(env: Mapping[str, str], variable: str, file_variable: str) -> list[str]:
    """The values of ``variable`` (comma-separated), or of the file ``file_variable`` names
    (comma- or newline-separated), in order, blanks dropped; [] when neither is set. A list
    is a rotation: webhook signing secrets, Fernet keys.

    Raises:
        ConfigurationError: both are set, or the file cannot be read (never a value).
    """
    value, path = env.get(variable, "").strip(), env.get(file_variable, "").strip()
    if value and path:
        raise ConfigurationError(f"set {variable} or {file_variable}, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            # The variable's name last: sanitize masks the word after "…KEY_FILE:".
            raise ConfigurationError(f"cannot read {path!r} ({why}), the file {file_variable} "
                                     "names") from None
    return [v.strip() for v in value.replace("\n", ",").split(",") if v.strip()]


def get_float(env: Mapping[str, str], variable: str, default: float) -> float:
    """Return a finite float > 0 from ``env[variable]``, or ``default`` when unset.

    Raises:
        ConfigurationError: not a number, not finite, or not > 0.
    """
    raw = get_str(env, variable, None)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{variable} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{variable} must be > 0, got {raw!r}")
    return value


def get_int(env: Mapping[str, str], variable: str, default: int) -> int:
    """Return an int >= 1 from ``env[variable]``, or ``default`` when unset.

    Raises:
        ConfigurationError: not an integer, or < 1.
    """
    raw = get_str(env, variable, None)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{variable} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ConfigurationError(f"{variable} must be >= 1, got {raw!r}")
    return value


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(url: str, *, variable: str) -> None:
    """Refuse URLs that are not https (or http to a loopback host), or that embed credentials.

    Raises:
        ConfigurationError: naming ``variable``.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigurationError(f"{variable} is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigurationError(f"{variable} must be an https:// URL with a host")
    if parts.username or parts.password:
        # Credentials belong in the API key variables, where they are masked.
        raise ConfigurationError(f"{variable} must not contain credentials")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{variable} must not contain a query or fragment")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ConfigurationError(
            f"{variable} uses plain http:// to non-loopback host {host!r}; use https://")
