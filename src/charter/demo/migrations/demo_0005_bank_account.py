"""Reference service: the customer's bank account on an invoice, seen by the finance role only.

The column is declared ``visible={"bank_account": A.has_role("finance")}`` on the
Invoice resource (charter.policy.visibility): left out of every read, list and
export of anyone else, and refused as a sort or filter.

Revision ID: demo_0005
Revises: demo_0004
"""

import sqlalchemy as sa
from alembic import op

revision = "demo_0005"
down_revision = "demo_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("invoices") as batch:
        batch.add_column(sa.Column("bank_account", sa.String(34), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("invoices") as batch:
        batch.drop_column("bank_account")
