"""HTTP request handler: routing, auth, rate limit, faults and Stripe-style idempotency.

Three provider APIs share the plumbing: email (SendGrid-shaped, ``/v3/``), CRM
(HubSpot-shaped, ``/crm/`` and its OAuth server ``/oauth/``) and payments (Stripe-shaped,
every other path); ``/_sandbox/hooks/`` is the receiver of the outbox's own signed webhooks
(``sandbox.hooks``) and ``/_sandbox/`` the control API. Each request answers errors in its provider's shape (``_flavor``).
Order for all: body read, rate limit, fault rule, auth, routing and validation, endpoint
(the effect), post-effect fault.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any

from sandbox import crm, hooks, mail, payments
from sandbox.auth import check_auth
from sandbox.control import PREFIX, handle_control
from sandbox.faults import FaultRule
from sandbox.payments import Result

MAX_BODY = 1024 * 1024
MAX_KEY_LEN = 255
DROPPED = "dropped"

_POSTS = {"/v1/payment_intents": payments.create_payment_intent,
          "/v1/refunds": payments.create_refund}
_GET_RE = re.compile(r"^/v1/(payment_intents|refunds)/([A-Za-z0-9_]+)$")


class _Dropped(Exception):
    """The connection was closed on purpose; nothing more may be written."""


PAYMENTS, EMAIL, CRM = "payments", "email", "crm"
_SERVER_ERROR = {
    "before": ("An error occurred with our connection to Stripe. (sandbox fault)",
               "An internal error occurred. (sandbox fault)"),
    "after": ("An unknown error occurred after processing. (sandbox fault)",
              "An internal error occurred after processing. (sandbox fault)"),
    "down": ("Service unavailable. (sandbox down)", "Service unavailable. (sandbox down)"),
}


class SandboxHandler(BaseHTTPRequestHandler):
    """Serves the payments API and the control API; one instance per connection."""

    protocol_version = "HTTP/1.1"
    server_version = "sandbox/1.0"

    def version_string(self) -> str:
        """The Server header: no Python version."""
        return self.server_version

    # --- plumbing -----------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silenced: the default line would include the raw request line."""

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """Print only method, path and status, and only when access logging is on."""
        if getattr(self.server, "access_log", False):
            path = self.path.split("?", 1)[0].replace("\r", "").replace("\n", "")
            sys.stderr.write(f"sandbox {self.command} {path[:200]} {code}\n")

    def do_GET(self) -> None:  # noqa: N802
        """Dispatch a GET."""
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        """Dispatch a POST."""
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        """Dispatch a DELETE."""
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        """Dispatch a PUT (always 405 or 404)."""
        self._dispatch()

    def do_PATCH(self) -> None:  # noqa: N802
        """Dispatch a PATCH (always 405 or 404)."""
        self._dispatch()

    @property
    def state(self):
        """The server's SandboxState."""
        return self.server.state

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        """Send a JSON body, or an empty one when ``body`` is None."""
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", "req_" + secrets.token_hex(7))
        version = self.headers.get("Stripe-Version")
        if version:
            self.send_header("Stripe-Version", version)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Account before the client can see the response, so stats read right after agree.
        self._account(status)
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        # Close without a response; the handler must not touch the socket afterwards.
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Dropped

    def _read_body(self) -> bytes | int:
        """Read the body, or answer 413/400 and return that status."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            return self._respond(self._invalid(400, "Invalid Content-Length."))
        if length > MAX_BODY:
            # Refused before reading; the unread body makes the connection unusable.
            self.close_connection = True
            return self._respond(self._invalid(413, "Request body too large (max 1 MiB)."))
        return self.rfile.read(length)

    def _dispatch(self) -> None:
        path, _, query = self.path.partition("?")
        self._path, self._query = path, query
        self._flavor = (EMAIL if path.startswith(mail.PREFIX)
                        else CRM if path.startswith(crm.PREFIXES) else PAYMENTS)
        try:
            if path.startswith(hooks.PREFIX):   # the receiver of the webhooks provider
                body = self._read_body()
                if not isinstance(body, int):
                    status, out, headers = self.state.hooks.handle(self.command, path,
                                                                   self.headers, body)
                    self._send(status, out, headers)
                return
            if path.startswith(PREFIX):
                body = self._read_body()
                if not isinstance(body, int):
                    status, out = handle_control(self.state, self.command, path, query, body)
                    self._send(status, out)
                return
            if self._flavor == EMAIL:
                self._email(path)
            elif self._flavor == CRM:
                self._crm(path)
            else:
                self._payments(path)
        except _Dropped:
            pass
        except OSError:
            self.close_connection = True

    # --- errors in the request's provider shape ------------------------------

    def _invalid(self, status: int, message: str) -> Result:
        if getattr(self, "_flavor", PAYMENTS) == EMAIL:
            return mail.error(status, message)
        if self._flavor == CRM:
            return crm.error(status, message, "VALIDATION_ERROR")
        return payments.error(status, "invalid_request_error", message)

    def _server_error(self, status: int, which: str) -> Result:
        payments_text, email_text = _SERVER_ERROR[which]
        if self._flavor == CRM:
            return crm.server_error(status, which)
        if self._flavor == EMAIL:
            return mail.error(status, email_text)
        return payments.error(status, "api_error", payments_text)

    def _too_many(self, retry_after: str | None, why: str) -> int:
        if self._flavor == EMAIL:
            result = mail.error(429, f"too many requests ({why})")
        elif self._flavor == CRM:
            result = crm.too_many()
        else:
            result = payments.error(429, "rate_limit_error", "Too many requests hit the API "
                                    f"too quickly. ({why})", code="rate_limit")
        return self._respond(result, {"Retry-After": retry_after} if retry_after is not None
                             else {})

    def _before_effect(self, path: str, key: str | None
                       ) -> tuple[int | None, FaultRule | None]:
        """The server-side rate limit, then a fault that answers before the effect: the
        status already answered (or None), and the fault rule for the rest of the request."""
        limited = self._over_rate_limit(path)
        if limited is not None:
            return limited, None
        rule = self.state.faults.pick(path, key or None)
        if rule is not None:
            early = self._pre_effect_fault(rule)
            if early is not None:
                return early, rule
        return None, rule

    def _over_rate_limit(self, path: str) -> int | None:
        """Answer 429 (no effect) if the server-side rate limit is exhausted; else None."""
        wait_s = self.state.admit(path)
        if wait_s is None:
            return None
        return self._too_many(str(wait_s), "sandbox rate limit")

    # --- payments API -------------------------------------------------------

    def _account(self, status: int | str) -> None:
        token, self._token = getattr(self, "_token", None), None
        if token is not None:
            self.state.end_request(token, status)

    def _payments(self, path: str) -> None:
        key = self.headers.get("Idempotency-Key")
        self._token = self.state.begin_request(path, key or "")
        try:
            self._payments_inner(path, key)
        finally:
            self._account(DROPPED)  # no-op unless no response was sent

    def _respond(self, result: Result, headers: dict[str, str] | None = None) -> int:
        limits = (self.state.rate_limit_headers(self._path) if self._flavor == EMAIL else {})
        self._send(result.status, result.body,
                   {**limits, **(result.headers or {}), **(headers or {})})
        return result.status

    def _payments_inner(self, path: str, key: str | None) -> int:
        body = self._read_body()
        if isinstance(body, int):
            return body
        early, rule = self._before_effect(path, key)
        if early is not None:
            return early
        auth = check_auth(self.headers.get("Authorization", ""), self.state)
        if auth is not None:
            return self._respond(auth)
        endpoint, args = self._route(path)
        if isinstance(endpoint, Result):   # a list, a search, a health check, or an error
            self._sleep_latency(rule)
            return self._respond(endpoint)
        if key is not None and (len(key) > MAX_KEY_LEN or not key.strip()):
            return self._respond(payments.invalid(
                "Idempotency-Key", "idempotency_key_invalid",
                f"Idempotency-Key must be 1 to {MAX_KEY_LEN} characters long."))
        if args is not None:  # a GET retrieve: no idempotency, no effect
            self._sleep_latency(rule)
            return self._finish(payments.retrieve(self.state, *args), rule, {})
        try:
            pairs, params = payments.parse_form(body)
        except payments.FormError as exc:
            return self._respond(payments.invalid("body", "parameter_invalid", str(exc)))
        with self.state.lock:
            use_key = key is not None and self.state.idempotency
        if not use_key:
            self._sleep_latency(rule)
            return self._finish(endpoint(self.state, params, key or ""), rule, {})
        return self._idempotent(endpoint, path, key, pairs, params, rule)

    def _idempotent(self, endpoint, path: str, key: str, pairs, params, rule) -> int:
        echo = {"Idempotency-Key": key}
        outcome, stored = self.state.idem_claim(key, ("POST", path, tuple(pairs)))
        if outcome == "conflict":
            return self._respond(payments.error(400, "idempotency_error", (
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request.")), echo)
        if outcome == "in_use":
            return self._respond(payments.error(409, "idempotency_error", (
                "There is currently another in-progress request using this Idempotent Key "
                "(that probably means you submitted twice, and the other request is still "
                "going through): " + key + ". Please try again later."),
                code="idempotency_key_in_use"), echo)
        if outcome == "replay":
            self._sleep_latency(rule)
            replay = Result(stored.status, stored.body)
            # A stored server error comes back the same every time: says so, as Stripe does.
            advice = {"Stripe-Should-Retry": "false"} if stored.status >= 500 else {}
            return self._finish(replay, rule,
                                {**echo, "Idempotent-Replayed": "true", **advice})
        try:
            self._sleep_latency(rule)
            result = endpoint(self.state, params, key)
        except BaseException:
            self.state.idem_release(key)
            raise
        if result.store:
            stored = result
            if rule is not None and rule.fault == "error_after" and self.state.store_errors:
                # Stripe saves the first answer under the key "regardless of whether it
                # succeeds or fails, including 500 errors": the 500 is what replays.
                stored = self._server_error(rule.params["status"], "after")
            self.state.idem_store(key, stored.status, stored.body)
        else:
            self.state.idem_release(key)
        return self._finish(result, rule, echo)

    def _pre_effect_fault(self, rule: FaultRule) -> int | None:
        """Answer a fault that fires before the endpoint runs; None to carry on."""
        p = rule.params
        if rule.fault == "error_before":
            return self._respond(self._server_error(p["status"], "before"))
        if rule.fault == "rate_limit":
            return self._too_many(p["retry_after"], "sandbox fault")
        if rule.fault == "status":
            if p["body"] is not None:
                return self._respond(Result(p["status"], p["body"]))
            return self._respond(self._invalid(p["status"], "Sandbox status fault."))
        if rule.fault == "down":
            if rule.params["mode"] == "503":
                return self._respond(self._server_error(503, "down"))
            while self.state.faults.active(rule.id):
                if self.state.stopping.wait(0.05):
                    self._drop()
            # A request caught by an outage never reaches the endpoint, even once it ends.
            return self._respond(self._server_error(503, "down"))
        return None

    def _sleep_latency(self, rule: FaultRule | None) -> None:
        if rule is not None and rule.fault == "latency":
            self.state.stopping.wait(rule.params["delay_s"])

    def _finish(self, result: Result, rule: FaultRule | None, headers: dict[str, str]) -> int:
        """Send the result, applying any fault that fires after the effect."""
        fault = rule.fault if rule is not None else None
        if fault == "error_after":
            return self._respond(self._server_error(rule.params["status"], "after"), headers)
        if fault == "drop_after":
            self._drop()
        if fault == "slow_after" and self.state.stopping.wait(rule.params["delay_s"]):
            self._drop()
        return self._respond(result, headers)

    # --- email API ------------------------------------------------------------

    def _email(self, path: str) -> None:
        # Counted under the header key now; moved to custom_args.outbox_key once parsed.
        key = self.headers.get(mail.KEY_HEADER) or ""
        self._token = self.state.begin_request(path, key)
        try:
            self._email_inner(path, key)
        finally:
            self._account(DROPPED)  # no-op unless no response was sent

    def _email_inner(self, path: str, header_key: str) -> int:
        body = self._read_body()
        if isinstance(body, int):
            return body
        try:
            document = mail.parse_json(body)
        except ValueError:
            document = None
            bad_json = True
        else:
            bad_json = False
        key = mail.outbox_key(document) or header_key
        if key != header_key and self._token is not None:
            self.state.rekey_request(self._token, key)
        early, rule = self._before_effect(path, key)
        if early is not None:
            return early
        auth = mail.check_auth(self.headers.get("Authorization", ""), self.state)
        if auth is not None:
            return self._respond(auth)
        if path == mail.SCOPES_PATH and self.command == "GET":   # the health check
            return self._respond(mail.scopes(self.state))
        if path == mail.MESSAGES_PATH and self.command == "GET":   # verify before retry
            return self._respond(mail.activity(self.state, getattr(self, "_query", "")))
        if path != mail.SEND_PATH:
            return self._respond(mail.error(404, "resource not found"))
        if self.command != "POST":
            return self._respond(mail.error(405, "method not allowed"))
        if bad_json:
            return self._respond(mail.error(400, "Bad Request: the body is not valid JSON."))
        problems = mail.validate(document)
        if problems:
            return self._respond(mail.errors(400, problems))
        self._sleep_latency(rule)
        return self._finish(mail.send(self.state, document, key), rule, {})

    # --- CRM API and its OAuth server ------------------------------------------------

    def _crm(self, path: str) -> None:
        # Counted under "" now; an upsert of one contact moves to its e-mail once parsed.
        self._token = self.state.begin_request(path, "")
        try:
            self._crm_inner(path)
        finally:
            self._account(DROPPED)  # no-op unless no response was sent

    def _crm_inner(self, path: str) -> int:
        body = self._read_body()
        if isinstance(body, int):
            return body
        key = crm.effect_key(path, body)
        if key and self._token is not None:
            self.state.rekey_request(self._token, key)
        early, rule = self._before_effect(path, key)
        if early is not None:
            return early
        denied = crm.check_token(self.state, path, self.headers.get("Authorization", ""))
        if denied is not None:
            return self._respond(denied)
        self._sleep_latency(rule)
        result = crm.serve(self.state, self.command, path, getattr(self, "_query", ""),
                           self.headers, body)
        return self._finish(result, rule, {})

    def _route(self, path: str):
        """Return (endpoint, None) for a POST, (None, args) for a GET, or (Result, None)."""
        if path == "/v1/balance":   # the outbox's synthetic health check
            if self.command != "GET":
                return _method_not_allowed(), None
            return payments.balance(self.state), None
        if path == "/v1/payment_intents/search" and self.command == "GET":   # verification
            return payments.search_payment_intents(self.state, getattr(self, "_query", "")), None
        if path == "/v1/refunds" and self.command == "GET":
            return payments.list_refunds(self.state, getattr(self, "_query", "")), None
        if path == "/v1/events":    # what a poller pages through
            if self.command != "GET":
                return _method_not_allowed(), None
            query = dict(urllib.parse.parse_qsl(getattr(self, "_query", "")))
            return Result(*self.state.webhooks.list_events(query)), None
        if path in _POSTS:
            if self.command != "POST":
                return _method_not_allowed(), None
            return _POSTS[path], None
        m = _GET_RE.match(path)
        if m:
            if self.command != "GET":
                return _method_not_allowed(), None
            return None, (m.group(1), m.group(2))
        return payments.error(404, "invalid_request_error",
                              f"Unrecognized request URL ({self.command}: {path[:200]})."), None


def _method_not_allowed() -> Result:
    return payments.error(405, "invalid_request_error", "Method not allowed for this URL.")
