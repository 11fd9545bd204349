"""Charter: an index from every record a call touched to the call's audit entry.

A call that changes records besides its target names them in its entry's
MAC-covered ``detail["touched"]``; this table lets ``charter audit show`` find
the entry from any of them (issue 8).

Revision ID: charter_0004
Revises: charter_0003
"""

import sqlalchemy as sa
from alembic import op

revision = "charter_0004"
down_revision = "charter_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "charter_audit_links",
        sa.Column("stream", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(128), nullable=False),
    )
    op.create_index(
        "ix_charter_audit_links_resource",
        "charter_audit_links",
        ["resource_type", "resource_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_charter_audit_links_resource", table_name="charter_audit_links")
    op.drop_table("charter_audit_links")
