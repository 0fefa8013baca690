"""Partial indexes for the working states, and ordered delivery per key.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

The relay, the lease recovery, the dead-letter queries and retention each read one
status. A partial index per working state keeps their cost proportional to the live rows
(a few thousand) instead of the table (millions of delivered rows). The old
``(status, next_attempt_at)`` index is dropped: the relay reads ``ix_outbox_pending_due``.

``ordering_key`` / ``ordering_seq``: messages with the same key (per provider) are
delivered one at a time in commit order.
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PARTIAL = (
    ("ix_outbox_pending_due", ["provider", "next_attempt_at", "id"], "status = 'pending'"),
    ("ix_outbox_queued", ["provider", "queued_at", "id"], "status = 'queued'"),
    ("ix_outbox_in_flight", ["lease_expires_at"], "status = 'in_flight'"),
    ("ix_outbox_dead", ["provider", "dead_at"], "status = 'dead'"),
    ("ix_outbox_delivered_at", ["delivered_at"], "status = 'delivered'"),
    ("ix_outbox_discarded_at", ["updated_at"], "status = 'discarded'"),
)


def _where(condition: str) -> dict:
    return {"postgresql_where": sa.text(condition), "sqlite_where": sa.text(condition)}


def upgrade() -> None:
    with op.batch_alter_table("outbox_messages") as batch:
        batch.add_column(sa.Column("ordering_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("ordering_seq", sa.Integer(), nullable=True))
    op.drop_index("ix_outbox_messages_status_due", table_name="outbox_messages")
    for name, columns, condition in PARTIAL:
        op.create_index(name, "outbox_messages", columns, **_where(condition))
    op.create_index("uq_outbox_ordering", "outbox_messages",
                    ["provider", "ordering_key", "ordering_seq"], unique=True,
                    **_where("ordering_key IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("uq_outbox_ordering", table_name="outbox_messages")
    for name, _columns, _condition in PARTIAL:
        op.drop_index(name, table_name="outbox_messages")
    op.create_index("ix_outbox_messages_status_due", "outbox_messages",
                    ["status", "next_attempt_at"])
    with op.batch_alter_table("outbox_messages") as batch:
        batch.drop_column("ordering_seq")
        batch.drop_column("ordering_key")
