"""Dead letters that need a person's review before any re-drive.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

A message is marked ``needs_review`` when it was dead-lettered because the provider may
already have acted and cannot deduplicate a retry (an ambiguous failure on a provider
without idempotency keys): re-driving it may act twice, so ``outbox dead redrive`` only
takes it with ``--accept-duplicate-risk``. Earlier rows carried this only in
``last_error`` ("needs review: …"); they are marked from it.
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox_messages") as batch:
        batch.add_column(sa.Column("needs_review", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    op.execute("UPDATE outbox_messages SET needs_review = TRUE "
               "WHERE status = 'dead' AND last_error LIKE 'needs review:%'")


def downgrade() -> None:
    with op.batch_alter_table("outbox_messages") as batch:
        batch.drop_column("needs_review")
