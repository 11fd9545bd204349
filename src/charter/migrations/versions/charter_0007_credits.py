"""Charter: credits and quotas — accounts, the double-entry ledger, holds, quota counters.

Revision ID: charter_0007
Revises: charter_0006
"""

import sqlalchemy as sa
from alembic import op

revision = "charter_0007"
down_revision = "charter_0006"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "charter_credit_accounts",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("currency", sa.String(12), nullable=False),
        sa.Column("exponent", sa.SmallInteger, nullable=False),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.Column("bounded", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("tenant", "name", name="uq_charter_credit_accounts_tenant_name"),
        sa.CheckConstraint("NOT bounded OR balance >= 0", name="ck_charter_credit_accounts_floor"),
    )
    op.create_table(
        "charter_ledger",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("debit", _ID, sa.ForeignKey("charter_credit_accounts.id"), nullable=False),
        sa.Column("credit", _ID, sa.ForeignKey("charter_credit_accounts.id"), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("action", sa.String(128), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("hold_id", _ID, nullable=True),
        sa.Column("refund_of", _ID, nullable=True),
        sa.CheckConstraint("amount > 0", name="ck_charter_ledger_amount"),
        sa.CheckConstraint("debit <> credit", name="ck_charter_ledger_two_accounts"),
    )
    op.create_index("uq_charter_ledger_refund_of", "charter_ledger", ["refund_of"], unique=True)
    op.create_table(
        "charter_credit_holds",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("reference", sa.String(64), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(128), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.UniqueConstraint("tenant", "reference", name="uq_charter_credit_holds_reference"),
        sa.CheckConstraint("amount > 0", name="ck_charter_credit_holds_amount"),
    )
    op.create_index(
        "ix_charter_credit_holds_pending", "charter_credit_holds", ["state", "expires_at"]
    )
    op.create_table(
        "charter_quota_counters",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("quota", sa.String(64), primary_key=True),
        sa.Column("period", sa.String(16), primary_key=True),
        sa.Column("used", sa.Integer, nullable=False),
        sa.CheckConstraint("used >= 0", name="ck_charter_quota_counters_used"),
    )


def downgrade() -> None:
    op.drop_table("charter_quota_counters")
    op.drop_index("ix_charter_credit_holds_pending", table_name="charter_credit_holds")
    op.drop_table("charter_credit_holds")
    op.drop_index("uq_charter_ledger_refund_of", table_name="charter_ledger")
    op.drop_table("charter_ledger")
    op.drop_table("charter_credit_accounts")
