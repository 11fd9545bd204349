"""Charter: audit trail and signed checkpoints.

Revision ID: charter_0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "charter_0001"
down_revision = None
branch_labels = ("charter",)
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "charter_audit",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("stream", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=True),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("subject_kind", sa.String(16), nullable=False),
        sa.Column("real_actor", sa.String(128), nullable=True),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("action", sa.String(128), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=True),
        sa.Column("resource_id", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("rule", sa.String(200), nullable=True),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("replayed", sa.Boolean, nullable=False),
        sa.Column("state_before", sa.String(64), nullable=True),
        sa.Column("state_after", sa.String(64), nullable=True),
        sa.Column("input_digest", sa.String(64), nullable=True),
        sa.Column("detail", sa.JSON, nullable=True),
        sa.UniqueConstraint("stream", "seq", name="uq_charter_audit_stream_seq"),
    )
    op.create_index(
        "ix_charter_audit_resource", "charter_audit", ["resource_type", "resource_id", "id"]
    )
    op.create_table(
        "charter_audit_checkpoints",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heads", sa.JSON, nullable=False),
        sa.Column("prev_signature", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("signature", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("charter_audit_checkpoints")
    op.drop_index("ix_charter_audit_resource", "charter_audit")
    op.drop_table("charter_audit")
