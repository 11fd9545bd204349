"""Charter: idempotency records.

Revision ID: charter_0002
Revises: charter_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "charter_0002"
down_revision = "charter_0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "charter_idempotency",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("action", sa.String(128), nullable=False),
        sa.Column("phase", sa.Integer, nullable=False),
        sa.Column("recovery", sa.JSON, nullable=True),
        sa.Column("request_input", sa.Text, nullable=True),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("tenant", "subject", "key", name="uq_charter_idempotency_scope"),
    )
    op.create_index(
        "ix_charter_idempotency_expiry",
        "charter_idempotency",
        ["expires_at"],
        postgresql_using="brin",
    )
    _outcomes()


def _outcomes() -> None:
    op.create_table(
        "charter_idempotency_outcomes",
        sa.Column("claim_id", _ID, primary_key=True),
        sa.Column("resource_id", sa.String(128), nullable=True),
        sa.Column("response_status", sa.Integer, nullable=False),
        sa.Column("response_body", sa.JSON, nullable=True),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("charter_idempotency_outcomes")
    op.drop_index("ix_charter_idempotency_expiry", "charter_idempotency")
    op.drop_table("charter_idempotency")
