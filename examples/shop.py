"""A small web shop: the model for accepting a request and enqueueing in the same transaction.

    POST /orders  {"reference": "A-1001", "amount": 1999, "currency": "usd", "customer": "cus_1"}
      → 201 {"order_id": 7, "reference": "A-1001", "amount": 1999, "currency": "usd",
             "customer": "cus_1", "charge_message_id": "01J…"}

One transaction
    ``place_order`` writes the order row and enqueues its ``payments.charge``, its
    ``email.send`` receipt, its ``crm.upsert_contact`` and its ``order.created`` webhooks in
    the caller's session; the request handler commits once. If anything fails before that
    commit, none of them exists. Once committed, the outbox delivers the charge exactly
    once in effect, even if this process dies the next moment.

Idempotent retries
    A client that got no answer (a timeout, a dropped connection) sends the same request
    again: that is the normal case, not an error. The ``reference`` is the order's
    idempotency key: unique in the orders table, and the outbox keys are made from it
    (``order-<reference>-charge``, ``-receipt``, ``-contact``). Sent again with the same
    body, it answers 200 with the existing order and writes nothing. With a different
    amount, currency or customer it answers 409. Two identical requests at the same moment:
    one inserts the order; the other's INSERT hits the unique constraint inside a SAVEPOINT,
    which undoes that INSERT only, so it reads the first order and answers 200. A check
    before the insert is not enough on its own: both requests can pass the check before
    either commits.

Answers (every body is JSON, errors are ``{"error": ...}``)
    201  the order is new; it was committed with its messages
    200  a retry of an existing order (same reference, same body); nothing was written
    409  the reference belongs to an order with a different body
    413  the body is over 16 KiB (refused before it is read when Content-Length says so)
    422  not a valid order: ``problems`` lists field paths and reasons, never the values sent
    404, 405  any other path or method

Input: ``reference`` is 1–100 printable ASCII characters (letters, digits, punctuation;
spaces only inside), so it is safe in an idempotency key and an HTTP header; ``amount`` a
JSON integer from 1 to 99999999 (minor units: 1999 is 19.99), never 19.5 or "19";
``currency`` an ISO 4217 code in lower case; ``customer`` (optional) the payment
provider's customer id. Unknown fields are refused. An ``X-Request-ID`` header of printable
ASCII, at most 255 characters, becomes the messages' correlation id; otherwise the shop
makes one.

``GET /docs`` shows the API (FastAPI's OpenAPI page).

Run it the way the Procfile does: ``python -m examples.shop`` serves on
127.0.0.1:$SHOP_PORT (default 8000) with uvicorn, using ``DATABASE_URL``; it creates its
own table at start (the outbox's tables come from ``outbox db upgrade``). Logs carry order
and message ids, never the customer or the request body.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from typing import Annotated

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import DateTime, Integer, String, func, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from outbox import (
    ConfigurationError,
    IdempotencyConflict,
    InvalidMessage,
    OutboxError,
    enqueue,
    logs,
)
from outbox.db import check_migrated, make_engine, make_sessionmaker
from outbox.endpoints import publish

log = logging.getLogger("examples.shop")

MAX_BODY_BYTES = 16 * 1024   # an order is a few hundred bytes


# ---- the order table and the function to copy ---------------------------------------------

class ShopBase(DeclarativeBase):
    """The shop's own tables (the outbox has its own metadata and migrations)."""


class Order(ShopBase):
    """One order. ``reference`` is unique: it is the order's idempotency key.

    ``amount``, ``currency`` and ``customer`` are everything a request carries besides the
    reference, so comparing them tells a retry (same body) from a conflict (another body).
    """

    __tablename__ = "shop_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reference: Mapped[str] = mapped_column(String(100), unique=True)
    amount: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3))
    customer: Mapped[str | None] = mapped_column(String(255))
    charge_message_id: Mapped[str | None] = mapped_column(String(26))
    created_at = mapped_column(DateTime, server_default=func.now())


class OrderPayment(ShopBase):
    """Whether an order is paid, as the payment provider said: set by the inbound handlers
    (``examples/handlers.py``) when ``payment_intent.succeeded`` or ``payment_failed``
    arrives, by webhook or by poll. An order without a row is still waiting."""

    __tablename__ = "shop_order_payments"

    reference: Mapped[str] = mapped_column(String(100), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))        # paid, failed
    payment_intent: Mapped[str | None] = mapped_column(String(255))
    updated_at = mapped_column(DateTime, server_default=func.now(), onupdate=func.now())


def payment_status(session: Session, reference: str) -> str:
    """``paid``, ``failed`` or ``awaiting payment``."""
    row = session.get(OrderPayment, reference)
    return row.status if row is not None else "awaiting payment"


class OrderConflict(Exception):
    """The reference already belongs to an order with a different amount, currency or customer."""


def place_order(session: Session, *, reference: str, amount: int, currency: str,
                customer: str | None = None, request_id: str | None = None) -> tuple[Order, bool]:
    """Record an order and enqueue its messages in the caller's transaction.

    The caller commits (or rolls back: then neither the order nor its messages exist).
    Safe to call again for the same order, also from a concurrent transaction: the unique
    ``reference`` decides which call creates the order.

    Returns:
        ``(order, created)``: ``created`` is False when an order with this reference and
        the same amount, currency and customer already existed; nothing was written then.

    Raises:
        OrderConflict: the reference belongs to an order with different details.
        outbox.InvalidMessage: the outbox refused a payload (nothing was written).
        outbox.IdempotencyConflict: an outbox key made from this reference is already
            used with another payload (the order table was emptied, for instance).
    """
    existing = _order_by_reference(session, reference)
    if existing is None:
        order = Order(reference=reference, amount=amount, currency=currency, customer=customer)
        try:
            # A SAVEPOINT: if a concurrent request inserted this reference first, the unique
            # constraint fails this INSERT only, and the caller's transaction goes on.
            with session.begin_nested():
                session.add(order)
        except IntegrityError:
            existing = _order_by_reference(session, reference)
            if existing is None:   # the constraint that failed was not the reference's
                raise
        else:
            order.charge_message_id = _enqueue_messages(session, order, request_id)
            return order, True
    if (existing.amount, existing.currency, existing.customer) != (amount, currency, customer):
        raise OrderConflict(f"order reference already used for order {existing.id} "
                            f"with a different amount, currency or customer")
    return existing, False


def _order_by_reference(session: Session, reference: str) -> Order | None:
    return session.scalars(select(Order).where(Order.reference == reference)).one_or_none()


def _enqueue_messages(session: Session, order: Order, request_id: str | None) -> str:
    """Enqueue the order's charge, its receipt email, the customer's crm contact and an
    ``order.created`` webhook per subscribed endpoint; returns the charge's message id."""
    payload = {"amount": order.amount, "currency": order.currency,
               "metadata": {"order": order.reference}}
    if order.customer is not None:
        payload["customer"] = order.customer
    charge = enqueue(session, provider="payments", operation="charge", payload=payload,
                     idempotency_key=f"order-{order.reference}-charge", correlation_id=request_id)
    enqueue(session, provider="email", operation="send",
            payload={"to": "customer@example.com", "subject": f"Your order {order.reference}",
                     "text": f"Thank you for your order {order.reference}."},
            idempotency_key=f"order-{order.reference}-receipt", correlation_id=request_id)
    enqueue(session, provider="crm", operation="upsert_contact",
            payload={"email": f"{order.customer or 'guest'}@example.com",
                     "properties": {"last_order": order.reference}},
            idempotency_key=f"order-{order.reference}-contact", correlation_id=request_id)
    # Your customers' webhook endpoints subscribed to order.created (none: nothing is added).
    publish(session, "order.created", {"order": order.reference, "amount": order.amount,
                                       "currency": order.currency},
            idempotency_key=f"order-{order.reference}-created", correlation_id=request_id)
    return charge.id


def create_tables(engine) -> None:
    """Create the shop's table if it is missing; refuse a table left by an older shop."""
    ShopBase.metadata.create_all(engine)
    columns = {column["name"] for column in inspect(engine).get_columns(Order.__tablename__)}
    missing = sorted(set(Order.__table__.columns.keys()) - columns)
    if missing:
        raise SystemExit(f"table {Order.__tablename__} was made by an older version of this "
                         f"example (no column {', '.join(missing)}); drop it and start again")


# ---- HTTP: what a request may contain and what it gets back --------------------------------

class OrderRequest(BaseModel):
    """The body of ``POST /orders``. Strict: no coercion ("19" is not 19), no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")

    reference: Annotated[str, Field(
        pattern=r"^[!-~](?:[ -~]{0,98}[!-~])?$",
        description="1-100 printable ASCII characters (letters, digits, punctuation, "
                    "spaces only inside); the order's idempotency key")]
    amount: Annotated[int, Field(ge=1, le=99_999_999,
                                 description="integer minor units (1999 is 19.99)")]
    currency: Annotated[str, Field(pattern=r"^[a-z]{3}$",
                                   description="ISO 4217 code in lower case, e.g. usd")]
    customer: Annotated[str | None, Field(
        default=None, pattern=r"^[A-Za-z0-9_-]{1,255}$",
        description="the payment provider's customer id (e.g. cus_123): 1-255 letters, "
                    "digits, '_' or '-'")]


class OrderResponse(BaseModel):
    """The order, the same for its first answer (201) and any retry (200)."""

    order_id: int
    reference: str
    amount: int
    currency: str
    customer: str | None
    charge_message_id: str | None


class Problem(BaseModel):
    field: str
    reason: str


class ErrorResponse(BaseModel):
    error: str
    problems: list[Problem] = []


def correlation_id(x_request_id: str | None) -> str:
    """The client's X-Request-ID if it is 1-255 printable ASCII characters, else a new id."""
    if x_request_id and len(x_request_id) <= 255 and x_request_id.isascii() \
            and x_request_id.isprintable():
        return x_request_id
    return uuid.uuid4().hex


def make_app(sessions: sessionmaker[Session]) -> FastAPI:
    """The shop's ASGI application, using ``sessions`` for its database."""
    app = FastAPI(title="Example shop")
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _internal_error)

    @app.post("/orders", status_code=201, response_model=OrderResponse, responses={
        200: {"model": OrderResponse, "description": "A retry: the existing order"},
        409: {"model": ErrorResponse, "description": "Reference used with another body"},
        413: {"model": ErrorResponse, "description": f"Body over {MAX_BODY_BYTES} bytes"},
        422: {"model": ErrorResponse, "description": "Not a valid order"},
    })
    def create_order(order: OrderRequest, response: Response,
                     x_request_id: Annotated[str | None, Header()] = None) -> OrderResponse:
        """Place an order: 201 when new, 200 when it repeats an existing order."""
        request_id = correlation_id(x_request_id)
        with sessions() as session:
            try:
                placed, created = place_order(session, **order.model_dump(),
                                              request_id=request_id)
                session.commit()
            except (OrderConflict, IdempotencyConflict):
                raise HTTPException(409, "this reference is already used with a different "
                                         "amount, currency or customer") from None
            except InvalidMessage as exc:   # the model above should have caught it already
                problem = {"field": getattr(exc, "path", "body"), "reason": str(exc)}
                return JSONResponse({"error": "invalid order", "problems": [problem]}, 422)
        if created:
            log.info("order %s placed, charge %s (request %s)",
                     placed.id, placed.charge_message_id, request_id)
        else:
            response.status_code = 200
            log.info("order %s requested again (request %s)", placed.id, request_id)
        return OrderResponse(order_id=placed.id, reference=placed.reference,
                             amount=placed.amount, currency=placed.currency,
                             customer=placed.customer, charge_message_id=placed.charge_message_id)

    @app.get("/orders/{reference}")
    def get_order(reference: str) -> dict:
        """An order and its payment status (``paid`` once the provider's webhook, or a
        poll, said so)."""
        with sessions() as session:
            order = session.scalar(select(Order).where(Order.reference == reference[:100]))
            if order is None:
                raise HTTPException(404, "no such order")
            return {"order_id": order.id, "reference": order.reference, "amount": order.amount,
                    "currency": order.currency, "payment": payment_status(session, reference)}

    return app


# ---- errors as JSON, without echoing what was sent ------------------------------------------

_WHOLE_BODY = "the body must be one JSON object (Content-Type: application/json)"


async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with a field path and a reason per problem; never the submitted values."""
    problems = []
    for error in exc.errors():
        path = [str(part) for part in error["loc"][1:]]   # loc[0] is "body"
        field = OrderRequest.model_fields.get(path[0]) if path else None
        if error["type"] == "extra_forbidden":   # the unknown name itself is not repeated
            problem = ("body", f"unknown field; allowed: {', '.join(OrderRequest.model_fields)}")
        elif error["type"] == "json_invalid":
            problem = ("body", "not valid JSON")
        elif not path:
            problem = ("body", _WHOLE_BODY)
        elif error["type"] == "string_pattern_mismatch" and field is not None:
            problem = (".".join(path), f"must be {field.description}")
        else:
            problem = (".".join(path), error["msg"])
        problems.append({"field": problem[0], "reason": problem[1]})
    return JSONResponse({"error": "invalid order", "problems": problems}, status_code=422)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every HTTP error (404, 405, 409, 413, …) as ``{"error": ...}``."""
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(_request: Request, _exc: Exception) -> JSONResponse:
    """A fault of the shop itself: 500 as JSON (the server still logs the traceback)."""
    return JSONResponse({"error": "internal error"}, status_code=500)


class BodySizeLimit:
    """Answer 413 to a request body over ``max_bytes``, without reading or buffering it.

    A Content-Length over the limit is refused before any of the body is read; a chunked
    body is counted as the application reads it. (FastAPI's own ``max_body_size`` answers
    the first case in text/plain; this shop promises JSON.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"error": self._too_large}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:   # FastAPI passes an HTTPException from here through
                raise HTTPException(413, self._too_large)
            return message

        await self.app(scope, counted_receive, send)

    @property
    def _too_large(self) -> str:
        return f"request body over {self.max_bytes} bytes"


# ---- python -m examples.shop ------------------------------------------------------------------

def _port() -> int:
    value = os.environ.get("SHOP_PORT", "8000")
    if not (value.isdigit() and 0 < int(value) < 65536):
        raise SystemExit(f"SHOP_PORT must be a TCP port number (1-65535), not {value!r}")
    return int(value)


def main() -> None:
    """Create the table and serve the shop on 127.0.0.1:$SHOP_PORT."""
    logs.configure()   # the outbox's log handler: sanitised lines (OUTBOX_LOG_FORMAT applies)
    port = _port()
    try:
        engine = make_engine(hide_parameters=True)   # SQL errors never print submitted values
        check_migrated(engine)
        create_tables(engine)
    except (OutboxError, ConfigurationError) as exc:   # one line and exit 2, as the CLI
        print(f"shop: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # access_log=False: it would record client addresses; the shop logs ids only.
    uvicorn.run(make_app(make_sessionmaker(engine)), host="127.0.0.1", port=port,
                log_config=None, access_log=False)


if __name__ == "__main__":
    main()
