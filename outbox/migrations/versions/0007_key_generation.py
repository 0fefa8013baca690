"""Key generations: a message whose idempotency key is spent at the provider (it stored an
error under it, which every retry with that key would replay) is verified, then sent
under the next key, ``<key>~<generation>`` (``outbox.lifecycle.Claim.provider_key``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox_messages") as batch:
        batch.add_column(sa.Column("key_generation", sa.Integer(), nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("outbox_messages") as batch:
        batch.drop_column("key_generation")
