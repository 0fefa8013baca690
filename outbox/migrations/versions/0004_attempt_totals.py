"""Attempt totals: the counters behind ``/metrics``; the operation in the status index.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

``outbox_attempt_totals`` holds attempts counted once and for all by ``outbox.totals``
(per provider, operation, outcome, error class, status code and duration bucket), so
that a scrape reads a few hundred rows instead of millions of attempts, and the counters
stay monotonic when retention deletes old attempts. ``outbox_rollups`` says how far the
counting has got.

``ix_outbox_messages_provider_status`` becomes ``(provider, status, operation)``: the
metrics count each operation's history exactly up to 10,000 rows, and without the
operation in the index an operation with few rows beside one with a million meant reading
the million.
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_outbox_messages_provider_status", table_name="outbox_messages")
    op.create_index("ix_outbox_messages_provider_status_op", "outbox_messages",
                    ["provider", "status", "operation"])
    op.create_table(
        "outbox_attempt_totals",
        sa.Column("provider", sa.String(64), primary_key=True),
        sa.Column("operation", sa.String(64), primary_key=True),
        sa.Column("outcome", sa.String(16), primary_key=True),
        sa.Column("error_class", sa.String(32), primary_key=True),
        sa.Column("status_code", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("bucket", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("duration_s_sum", sa.Float(), nullable=False),
    )
    op.create_table(
        "outbox_rollups",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("candidate_id", sa.BigInteger(), nullable=False),
        sa.Column("candidate_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("outbox_rollups")
    op.drop_table("outbox_attempt_totals")
    op.drop_index("ix_outbox_messages_provider_status_op", table_name="outbox_messages")
    op.create_index("ix_outbox_messages_provider_status", "outbox_messages",
                    ["provider", "status"])
