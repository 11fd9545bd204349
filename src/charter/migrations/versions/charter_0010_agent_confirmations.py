"""Charter: agents' calls that wait for a person's confirmation (issue 12, charter.confirmations).

Revision ID: charter_0010
Revises: charter_0009
"""

import sqlalchemy as sa
from alembic import op

revision = "charter_0010"
down_revision = "charter_0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "charter_agent_confirmations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("action", sa.String(128), nullable=False),
        sa.Column("target", sa.String(128), nullable=True),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("agent", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("actor", sa.JSON, nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_by", sa.String(128), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(64), nullable=True),
    )
    op.create_index(
        "ix_charter_agent_confirmations_tenant_state",
        "charter_agent_confirmations",
        ["tenant", "state", "created_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_charter_agent_confirmations_tenant_state", "charter_agent_confirmations")
    op.drop_table("charter_agent_confirmations")
