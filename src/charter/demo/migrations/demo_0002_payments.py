"""Reference service: invoice payments (charge id, paid at).

Revision ID: demo_0002
Revises: demo_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "demo_0002"
down_revision = "demo_0001"
branch_labels = None
depends_on = "charter_0002"


def upgrade() -> None:
    with op.batch_alter_table("invoices") as batch:
        batch.add_column(sa.Column("charge_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("invoices") as batch:
        batch.drop_column("paid_at")
        batch.drop_column("charge_id")
