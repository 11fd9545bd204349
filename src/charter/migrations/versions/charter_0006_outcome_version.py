"""Charter: a stored outcome keeps the record's version, so a replay answers its ETag.

Revision ID: charter_0006
Revises: charter_0005
"""

import sqlalchemy as sa
from alembic import op

revision = "charter_0006"
down_revision = "charter_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("charter_idempotency_outcomes", sa.Column("version", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("charter_idempotency_outcomes") as batch:
        batch.drop_column("version")
