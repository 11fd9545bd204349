"""Charter: support impersonation sessions, and an index to find the actions under them.

``charter_impersonation_sessions`` holds one row per session (who acts for whom,
why, until when, and how it ended: :mod:`charter.sessions`). The audit trail
gains a *partial* index on ``(real_actor, subject, at)`` over impersonated
entries only, so a user's "who acted on my behalf" finds them without a scan,
and the ordinary entries (``real_actor`` NULL) cost it nothing.

Revision ID: charter_0011
Revises: charter_0010
"""

import sqlalchemy as sa
from alembic import op

revision = "charter_0011"
down_revision = "charter_0010"
branch_labels = None
depends_on = None

_WHERE = sa.text("real_actor IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "charter_impersonation_sessions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("support_id", sa.String(128), nullable=False),
        sa.Column("subject_id", sa.String(128), nullable=False),
        sa.Column("grants", sa.JSON, nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_by", sa.String(128), nullable=True),
        sa.Column("end_reason", sa.Text, nullable=True),
    )
    op.create_index(
        "ix_charter_impersonation_sessions_subject",
        "charter_impersonation_sessions",
        ["tenant", "subject_id"],
    )
    op.create_index(
        "ix_charter_impersonation_sessions_support",
        "charter_impersonation_sessions",
        ["tenant", "support_id"],
    )
    op.create_index(
        "ix_charter_audit_impersonation",
        "charter_audit",
        ["real_actor", "subject", "at"],
        postgresql_where=_WHERE,
        sqlite_where=_WHERE,
    )


def downgrade() -> None:
    op.drop_index("ix_charter_audit_impersonation", table_name="charter_audit")
    op.drop_table("charter_impersonation_sessions")
