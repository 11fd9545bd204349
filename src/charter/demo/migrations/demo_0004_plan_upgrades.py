"""Reference service: plan-upgrade flows (a server-side record per multi-request flow).

Revision ID: demo_0004
Revises: demo_0003
"""

import sqlalchemy as sa
from alembic import op

revision = "demo_0004"
down_revision = "demo_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plan_upgrades",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("actor_id", sa.String(64), nullable=False),
        sa.Column("plan", sa.String(32), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("steps", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_plan_upgrades_tenant_id", "plan_upgrades", ["tenant_id"])


def downgrade() -> None:
    op.drop_table("plan_upgrades")
