"""Reference service: a provider's charge id names at most one invoice per tenant.

Support looks an invoice up by the charge id the payment provider shows
(``GET /charges/{charge_id}/invoice``), and Charter locates a target by a
column only when it is unique within the tenant.

Revision ID: demo_0003
Revises: demo_0002
"""

from alembic import op

revision = "demo_0003"
down_revision = "demo_0002"
branch_labels = None
depends_on = "charter_0004"


def upgrade() -> None:
    op.create_index(
        "uq_invoices_tenant_charge", "invoices", ["tenant_id", "charge_id"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_invoices_tenant_charge", table_name="invoices")
