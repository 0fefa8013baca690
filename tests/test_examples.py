"""The example shop: the order, its charge and its receipt commit or roll back together."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from examples.shop import Order, ShopBase, place_order
from outbox import InvalidMessage, Message


@pytest.fixture
def shop(engine, sessions, publisher):
    ShopBase.metadata.create_all(engine)
    return sessions


def _counts(sessions):
    with sessions() as s:
        return (s.scalar(select(func.count()).select_from(Order)),
                s.scalar(select(func.count()).select_from(Message)))


def test_an_order_commits_with_its_charge_and_receipt(shop):
    """Commit → 1 order row and 2 outbox rows (payments.charge, email.send)."""
    with shop() as session:
        place_order(session, reference="A-1", amount=1999, currency="usd")
        session.commit()
    assert _counts(shop) == (1, 2)


def test_a_failed_order_leaves_no_charge_behind(shop):
    """An invalid amount fails enqueue; rolling back removes the order too: nothing to send."""
    with shop() as session:
        with pytest.raises(InvalidMessage):
            place_order(session, reference="A-2", amount=-5, currency="usd")
        session.rollback()
    assert _counts(shop) == (0, 0)
