"""Test helpers: a fake transport so adapter and client tests need no network.

    def handler(request: requests.PreparedRequest):
        return 200, {"Content-Type": "application/json"}, {"id": "pi_1", ...}

    client = HttpClient(settings, transport=MockTransport(handler))

The handler returns ``(status, headers, body)`` — body ``bytes``, ``str``, or anything
JSON-serialisable (sent as ``application/json``) — or a ``requests.Response``, or raises
a ``requests`` exception to simulate a transport failure. Every call is recorded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import requests
from requests.structures import CaseInsensitiveDict

Handler = Callable[[requests.PreparedRequest], Any]


@dataclass(frozen=True)
class Call:
    """One request the transport saw."""

    request: requests.PreparedRequest
    timeout: tuple[float, float]


class MockTransport:
    """A ``Transport`` that answers with ``handler`` instead of the network."""

    def __init__(self, handler: Handler):
        """Args: handler: called with each PreparedRequest; see the module docstring."""
        self.handler = handler
        self.calls: list[Call] = []
        self.closed = False

    def send(self, prepared: requests.PreparedRequest,
             timeout: tuple[float, float]) -> requests.Response:
        """Record the call and turn the handler's answer into a ``requests.Response``."""
        self.calls.append(Call(prepared, timeout))
        result = self.handler(prepared)
        if isinstance(result, requests.Response):
            return result
        status, headers, body = result
        return build_response(prepared, status, headers, body)

    def close(self) -> None:
        """Mark the transport closed."""
        self.closed = True


def build_response(prepared: requests.PreparedRequest, status: int,
                   headers: Mapping[str, str] | None = None, body: Any = b"") -> requests.Response:
    """A ``requests.Response`` as the real transport would return it."""
    headers = CaseInsensitiveDict(headers or {})
    if isinstance(body, str):
        content = body.encode("utf-8")
    elif isinstance(body, bytes | bytearray):
        content = bytes(body)
    elif body is None:
        content = b""
    else:
        content = json.dumps(body).encode("utf-8")
        headers.setdefault("Content-Type", "application/json")
    response = requests.Response()
    response.status_code = status
    response.headers = headers
    response._content = content
    response.url = prepared.url or ""
    response.request = prepared
    response.encoding = "utf-8"
    return response


def sequence(*answers: Any) -> Handler:
    """A handler that returns (or raises, for exceptions) ``answers`` in order, then the last."""
    remaining = list(answers)

    def handler(_request: requests.PreparedRequest) -> Any:
        answer = remaining.pop(0) if len(remaining) > 1 else remaining[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    return handler
