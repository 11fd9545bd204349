"""Charter: a stored outcome keeps the charged account's balance, so a replay answers it too.

Revision ID: charter_0009
Revises: charter_0008
"""

import sqlalchemy as sa
from alembic import op

revision = "charter_0009"
down_revision = "charter_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    balance = sa.Column("balance", sa.BigInteger, nullable=True)
    op.add_column("charter_idempotency_outcomes", balance)


def downgrade() -> None:
    with op.batch_alter_table("charter_idempotency_outcomes") as table:
        table.drop_column("balance")
