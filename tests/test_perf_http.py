"""``HttpClient.prepare`` builds form bodies itself: the result must be what requests builds."""

from __future__ import annotations

import pytest
import requests

from integrations.base import Request
from integrations.http import USER_AGENT, HttpClient
from integrations.settings import ProviderSettings

KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"


def client() -> HttpClient:
    settings = ProviderSettings.from_env("payments", {"OUTBOX_PAYMENTS_API_KEY": KEY})
    return HttpClient(settings, transport=object())


def reference(c: HttpClient, request: Request, auth=None) -> requests.PreparedRequest:
    """What ``prepare`` returned when it handed requests the dict."""
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **request.headers}
    if auth == "bearer":
        headers["Authorization"] = f"Bearer {KEY}"
    kwargs = {"data": dict(request.form)} if request.form is not None else {}
    if request.form is None and request.json is not None:
        kwargs = {"json": request.json}
    return requests.Request(request.method.upper(), c.settings.base_url + request.path,
                            headers=headers, **kwargs).prepare()


def shape(p: requests.PreparedRequest):
    return p.method, p.url, list(p.headers.items()), p.body, type(p.body)


@pytest.mark.parametrize("request_", [
    Request("POST", "/v1/payment_intents", headers={"Idempotency-Key": "k-1"},
            form={"amount": "2000", "currency": "usd", "metadata[order]": "a&b=c é/ü+",
                  "confirm": "true"}),
    # Request.form maps str to str (test_integrations_http: other values are refused).
    Request("post", "/v1/refunds?expand=x", form={"amount": "5", "n": "", "l": "a b",
                                                  "t": "c+d%", "b": "\xff\x00"}),
    Request("POST", "/v1/x", form={}),
    Request("POST", "/v1/x", form={"only": ""}),
    Request("POST", "/v1/x", headers={"Content-Type": "text/plain"}, form={"a": "b"}),
    Request("PUT", "/v1/x", form={"a": ""}),
    Request("POST", "/v3/mail/send", json={"to": "a@example.com", "n": [1, 2]}),
    Request("GET", "/v1/x"),
    Request("DELETE", "/v1/x?y=1"),
])
@pytest.mark.parametrize("auth", [None, "bearer"])
def test_prepared_request_is_unchanged(request_, auth):
    c = client()
    assert shape(c.prepare(request_, auth=auth)) == shape(reference(c, request_, auth))
