"""What a provider adapter is: it builds requests and parses responses; it does no I/O.

The shared ``HttpClient`` (``integrations.http``) sends what adapters build, so
timeouts, TLS, credentials and sanitised logging live in one place and adapter
tests need only a fake transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

    from integrations.credentials import Credential
    from integrations.settings import ProviderSettings


@dataclass(frozen=True)
class Request:
    """An HTTP request an adapter wants sent. ``path`` is joined to the provider's base URL,
    unless ``url`` is set: then ``url`` is the target and ``path`` only names the request in
    logs (the webhooks provider: each endpoint has its own URL, which may hold a token).

    ``content`` is sent byte for byte (the adapter sets ``Content-Type``): for a body that
    is signed, whose bytes must be exactly those the signature covers."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    form: Mapping[str, str] | None = None   # sent form-encoded
    json: Any = None                        # sent as JSON when form is None
    content: bytes | None = None            # sent as is; wins over form and json
    url: str | None = None                  # absolute; wins over the base URL and path


@dataclass(frozen=True)
class Response:
    """What came back. ``body`` is the decoded JSON body, or None if it was not JSON."""

    status_code: int
    headers: Mapping[str, str]   # case-insensitive mapping
    body: Any
    elapsed_s: float


@dataclass(frozen=True)
class Delivery:
    """A successful delivery: the provider's reference and a short safe summary for logs/Flower."""

    status_code: int
    provider_ref: str | None
    summary: str


DONE, NOT_DONE, UNKNOWN = "done", "not_done", "unknown"


@dataclass(frozen=True)
class Verification:
    """What a lookup at the provider says about an operation whose outcome was ambiguous:
    ``done`` (with the provider's reference), ``not_done`` (safe to send again) or
    ``unknown`` (it cannot tell: a person decides, as without verification)."""

    state: str
    provider_ref: str | None = None
    summary: str = ""


class Adapter(ABC):
    """One provider's protocol. Subclasses set the class attributes and two methods."""

    name: str
    operations: frozenset[str]
    supports_idempotency: bool = False
    # How the shared client authenticates requests: "bearer" adds
    # "Authorization: Bearer <key>" from the provider's credential; None adds nothing.
    auth: str | None = None
    # False: the provider has no base URL (OUTBOX_<NAME>_BASE_URL is not read); every request
    # it builds carries its own absolute ``url`` (webhooks: one per subscriber endpoint).
    has_base_url: bool = True
    # Limits the provider documents, used when OUTBOX_<NAME>_RATE_LIMIT (or the operation's)
    # is not set: e.g. "100/s", {"refund": "25/s"}. None: no default limit.
    rate_limit: str | None = None
    operation_rate_limits: Mapping[str, str] | None = None

    # How long the provider's lookup (``verify_request``) may lag behind its effects: a
    # "not found" earlier than this after the ambiguous call proves nothing. The default of
    # OUTBOX_<NAME>_VERIFY_AFTER; None: this provider cannot verify.
    verify_after_s: float | None = None

    def verify_request(self, operation: str, payload: Mapping[str, Any],
                       idempotency_key: str) -> Request | None:
        """A side-effect-free lookup of whether ``operation`` under ``idempotency_key`` took
        effect (verify before retry, after an ambiguous failure); None: no lookup."""
        return None

    def verification(self, operation: str, response: Response, idempotency_key: str,
                     payload: Mapping[str, Any]) -> Verification:
        """Read the answer to ``verify_request`` for ``idempotency_key`` (and ``payload``,
        the operation asked for). Raise the classified ``IntegrationError`` for a non-2xx
        answer."""
        return Verification(UNKNOWN)

    def credential(self, settings: ProviderSettings, environ: Mapping[str, str] | None,
                   client: redis.Redis | None) -> Credential | None:
        """The credential behind ``auth`` when it is not the API key of
        ``OUTBOX_<NAME>_API_KEY`` (an OAuth2 token source: ``integrations.crm``), given the
        provider's settings, the environment and the shared Redis client (None: no Redis);
        None: the API key."""
        return None

    def check_request(self) -> Request | None:
        """A cheap, side-effect-free request that proves the credential works (the
        synthetic health check, ``integrations.checks``); None: this provider has none."""
        return None

    def check_problem(self, response: Response) -> str | None:
        """What is wrong with a 2xx answer to ``check_request`` (None: nothing)."""
        return None

    @abstractmethod
    def build_request(self, operation: str, payload: Mapping[str, Any],
                      idempotency_key: str) -> Request:
        """Return the request for ``operation``. Raises ValueError for an unknown operation."""

    @abstractmethod
    def parse_response(self, operation: str, response: Response) -> Delivery:
        """Return the Delivery for a success, or raise the classified ``IntegrationError``."""
