"""What the webhooks provider knows of a subscriber endpoint, and where it gets it from.

Endpoints are rows of the outbox's database (``outbox.endpoints``), which this package may
not import: the provider reads them through ``EndpointStore``, a protocol the outbox
implements and installs (``install``) in every process that delivers — the Celery worker,
on importing ``tasks.delivery``. Until one is installed a delivery is deferred, not failed.

Signing secrets are ``whsec_`` + base64 of 24 random bytes (the Standard Webhooks form);
an ``Endpoint`` holds them decrypted, so it never shows them in ``repr``.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24
ALLOW_HOSTS_VARIABLE = "OUTBOX_WEBHOOKS_ALLOW_HOSTS"
GONE_REASON = "410 Gone"


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def allow_hosts(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """``OUTBOX_WEBHOOKS_ALLOW_HOSTS``: hosts exempt from the SSRF address check (the sandbox
    and tests on loopback), lower case; empty by default."""
    env = os.environ if environ is None else environ
    raw = env.get(ALLOW_HOSTS_VARIABLE, "")
    return frozenset(h.strip().lower() for h in raw.split(",") if h.strip())


@dataclass(frozen=True)
class Endpoint:
    """One subscriber endpoint, as a delivery needs it.

    Attributes:
        id: ``ep_…``.
        url: where events are POSTed.
        secrets: the signing secrets to sign with, newest first: the current one, then the
            previous one while it has not expired (a rotation).
        enabled: False once disabled (by hand, or after a 410).
        disabled_reason: why, when disabled.
        rate_limit: the endpoint's own limit (``10/s``), or None for the provider's default.
    """

    id: str
    url: str
    secrets: tuple[str, ...] = field(repr=False)
    enabled: bool = True
    disabled_reason: str | None = None
    rate_limit: str | None = None


class EndpointStore(Protocol):
    """Where the provider reads endpoints and records that one is gone."""

    def get(self, endpoint_id: str) -> Endpoint | None:
        """The endpoint with its decrypted secrets, or None if there is no such endpoint.

        Raises:
            ConfigurationError: the secrets cannot be decrypted (no or wrong
                ``OUTBOX_SECRET_KEY``).
        """

    def disable(self, endpoint_id: str, reason: str) -> None:
        """Disable the endpoint (later deliveries dead-letter ``endpoint_disabled``)."""


_store: EndpointStore | None = None


def install(store: EndpointStore | None) -> None:
    """Make ``store`` the process's endpoint store (None: none)."""
    global _store
    _store = store


def installed() -> EndpointStore | None:
    """The process's endpoint store, or None."""
    return _store
