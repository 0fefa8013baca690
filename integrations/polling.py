"""The provider side of polling: paging through a provider's list of events, through the
provider's HTTP client and its shared protection (the same rate limit, breaker and quota
as deliveries). The cycle that stores pages with their cursor is ``outbox.polling``.

Stripe's pagination: the list is newest first; ``ending_before=<id>`` gives the ``limit``
events just newer than ``id`` (and ``has_more`` when there are newer still), so a poller
walks forward from its cursor page by page. With no cursor yet, it walks back from the
newest event through ``starting_after`` over ``OUTBOX_<NAME>_POLL_LOOKBACK`` (default one
day), then sets the cursor to the newest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from urllib.parse import urlencode

from .base import Request
from .classify import classify
from .errors import InvalidResponse
from .payments import STRIPE_VERSION

PAGE = 100


class StripeEvents:
    """``GET /v1/events`` of a Stripe-shaped provider (``integrations.registry.Provider``)."""

    def __init__(self, provider, page: int = PAGE):
        self.provider = provider
        self.page = page

    def _get(self, query: dict) -> dict:
        request = Request("GET", "/v1/events?" + urlencode(query),
                          headers={"Stripe-Version": STRIPE_VERSION})
        protection = self.provider.protection
        permit = protection.admit("poll") if protection is not None else None
        error: BaseException | None = None
        try:
            response = self.provider.client.send(request, auth=self.provider.adapter.auth)
            if protection is not None:
                protection.observe(response)
            error = classify(response)
            if error is not None:
                raise error
            body = response.body
            if not (isinstance(body, dict) and isinstance(body.get("data"), list)
                    and all(isinstance(e, dict) and isinstance(e.get("id"), str)
                            and isinstance(e.get("type"), str) for e in body["data"])):
                error = InvalidResponse("the events list is not a Stripe list",
                                        status_code=response.status_code)
                raise error
            return body
        except BaseException as exc:
            error = exc
            raise
        finally:
            if permit is not None:
                permit.release(error)

    def newer(self, cursor: str) -> Iterator[tuple[list[dict], str]]:
        """Pages of the events after ``cursor``, each oldest first, with its newest id."""
        while True:
            body = self._get({"limit": self.page, "ending_before": cursor})
            data = body["data"]
            if not data:
                return
            cursor = data[0]["id"]
            yield list(reversed(data)), cursor
            if not body.get("has_more"):
                return

    def since(self, created_gte: int) -> Iterator[list[dict]]:
        """Pages of every event created since ``created_gte``, newest page first."""
        query: dict = {"limit": self.page, "created[gte]": created_gte}
        while True:
            body = self._get(query)
            data = body["data"]
            if not data:
                return
            yield list(reversed(data))
            if not body.get("has_more"):
                return
            query = {**query, "starting_after": data[-1]["id"]}


# Providers with an events list: name → factory taking the provider.
SOURCES: dict[str, Callable] = {"payments": StripeEvents}
