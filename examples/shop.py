"""A tiny web shop: placing an order writes the order, its charge and its receipt email in
ONE transaction.

    POST /orders  {"reference": "A-1001", "amount": 1999, "currency": "usd", "customer": "cus_1"}
      → 201 {"order_id": 7, "message_id": "01J…", "status": "pending"}

If anything fails before commit, neither the order nor the charge exists; once
committed, the charge will be made exactly once, even if this process dies the
next moment. Standard-library WSGI, so there is nothing to learn but the outbox.
"""

from __future__ import annotations

import json
import os
import uuid
from wsgiref.simple_server import WSGIRequestHandler, make_server

from sqlalchemy import DateTime, Integer, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import InvalidMessage, OutboxError, enqueue
from outbox.db import make_engine, make_sessionmaker


class ShopBase(DeclarativeBase):
    pass


class Order(ShopBase):
    __tablename__ = "shop_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reference: Mapped[str] = mapped_column(String(100), unique=True)
    amount: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3))
    created_at = mapped_column(DateTime, server_default=func.now())


def place_order(session: Session, *, reference: str, amount: int, currency: str,
                customer: str | None = None, request_id: str | None = None) -> tuple[Order, str]:
    """Record the order and enqueue its charge and receipt in the caller's transaction
    (the caller commits)."""
    order = Order(reference=reference, amount=amount, currency=currency)
    session.add(order)
    session.flush()
    payload = {"amount": amount, "currency": currency, "metadata": {"order": reference}}
    if customer:
        payload["customer"] = customer
    message = enqueue(session, provider="payments", operation="charge", payload=payload,
                      idempotency_key=f"order-{reference}-charge", correlation_id=request_id)
    enqueue(session, provider="email", operation="send",
            payload={"to": "customer@example.com", "subject": f"Your order {reference}",
                     "text": f"Thank you for your order {reference}."},
            idempotency_key=f"order-{reference}-receipt", correlation_id=request_id)
    return order, message.id


def make_app(sessions):
    """The WSGI application."""

    def app(environ, start_response):
        def reply(status, body):
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(body).encode()]

        if environ["PATH_INFO"] != "/orders" or environ["REQUEST_METHOD"] != "POST":
            return reply("404 Not Found", {"error": "POST /orders"})
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            data = json.loads(environ["wsgi.input"].read(min(length, 65536)) or b"{}")
            reference = str(data["reference"])
            amount, currency = data["amount"], data.get("currency", "usd")
        except (ValueError, KeyError, TypeError):
            return reply("400 Bad Request", {"error": "need JSON reference, amount, currency"})
        request_id = environ.get("HTTP_X_REQUEST_ID") or uuid.uuid4().hex
        with sessions() as session:
            try:
                order, message_id = place_order(session, reference=reference, amount=amount,
                                                currency=currency, customer=data.get("customer"),
                                                request_id=request_id)
                session.commit()
            except InvalidMessage as exc:
                session.rollback()
                return reply("422 Unprocessable Entity", {"error": str(exc)})
            except OutboxError as exc:
                session.rollback()
                return reply("409 Conflict", {"error": str(exc)})
            return reply("201 Created", {"order_id": order.id, "message_id": message_id,
                                         "status": "pending"})

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # the driver prints its own summary
        pass


def main() -> None:
    engine = make_engine()
    ShopBase.metadata.create_all(engine)
    port = int(os.environ.get("SHOP_PORT", "8000"))
    server = make_server("127.0.0.1", port, make_app(make_sessionmaker(engine)),
                         handler_class=_QuietHandler)
    print(f"shop listening on http://127.0.0.1:{port}/orders", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
