"""Poll cursors: where each provider's poller is, and when it polls next.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox_poll_cursors",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("cursor", sa.String(255), nullable=True),
        sa.Column("interval_s", sa.Float(), nullable=False),
        sa.Column("next_poll_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("outbox_poll_cursors")
