"""Outbox messages, attempts and audit trail.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox_messages",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("correlation_id", sa.String(255)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("rate_limited_count", sa.Integer(), nullable=False),
        sa.Column("lease_token", sa.Integer(), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime()),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("queued_at", sa.DateTime()),
        sa.Column("delivered_at", sa.DateTime()),
        sa.Column("dead_at", sa.DateTime()),
        sa.Column("budget_started_at", sa.DateTime(), nullable=False),
        sa.Column("last_error_class", sa.String(32)),
        sa.Column("last_status_code", sa.Integer()),
        sa.Column("last_error", sa.Text()),
        sa.Column("provider_ref", sa.String(255)),
        sa.UniqueConstraint("provider", "idempotency_key", name="uq_outbox_messages_provider_key"),
    )
    op.create_index("ix_outbox_messages_status_due", "outbox_messages",
                    ["status", "next_attempt_at"])
    op.create_index("ix_outbox_messages_provider_status", "outbox_messages",
                    ["provider", "status"])
    op.create_table(
        "outbox_attempts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(26), sa.ForeignKey("outbox_messages.id"),
                  nullable=False),
        sa.Column("lease_token", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("error_class", sa.String(32)),
        sa.Column("error", sa.Text()),
        sa.Column("next_attempt_at", sa.DateTime()),
        sa.Column("worker", sa.String(255)),
    )
    op.create_index("ix_outbox_attempts_message_id", "outbox_attempts", ["message_id"])
    op.create_index("ix_outbox_attempts_started_at", "outbox_attempts", ["started_at"])
    op.create_table(
        "outbox_audit",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("message_id", sa.String(26), sa.ForeignKey("outbox_messages.id")),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON()),
    )
    op.create_index("ix_outbox_audit_at", "outbox_audit", ["at"])
    op.create_index("ix_outbox_audit_message_id", "outbox_audit", ["message_id"])


def downgrade() -> None:
    op.drop_table("outbox_audit")
    op.drop_table("outbox_attempts")
    op.drop_table("outbox_messages")
