"""The shop's inbound handlers: an order is paid when the payment provider says so.

Loaded by the inbound worker through ``OUTBOX_HANDLERS=examples.handlers`` (the Procfile
sets it for ``make run``). Each handler runs in the event's transaction (``outbox.inbound``):
the order's payment row and the event's "processed" mark commit together, so a crash
between them cannot mark an order paid twice or lose the event.

``payment_intent.succeeded`` → paid; ``payment_intent.payment_failed`` (a declined card) →
failed, unless it was paid already (a re-driven charge that went through after a decline
wins, whatever order the two events arrive in).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from examples.shop import OrderPayment
from outbox.inbound import Event, handler


def _reference(event: Event) -> str | None:
    obj = (event.data.get("data") or {}).get("object") or {}
    return (obj.get("metadata") or {}).get("order")


@handler("payments", "payment_intent.succeeded")
def order_paid(session: Session, event: Event) -> None:
    reference = _reference(event)
    if reference is None:
        return   # not one of the shop's charges
    intent = event.data["data"]["object"].get("id")
    row = session.get(OrderPayment, reference)
    if row is None:
        session.add(OrderPayment(reference=reference, status="paid", payment_intent=intent))
    else:
        row.status, row.payment_intent = "paid", intent


@handler("payments", "payment_intent.payment_failed")
def order_payment_failed(session: Session, event: Event) -> None:
    reference = _reference(event)
    if reference is None:
        return
    row = session.get(OrderPayment, reference)
    if row is None:
        session.add(OrderPayment(reference=reference, status="failed",
                                 payment_intent=event.data["data"]["object"].get("id")))
    # already paid (or failed): leave it
