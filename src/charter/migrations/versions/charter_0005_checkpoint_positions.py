"""Charter: checkpoints get a unique position, a kind and the anchor they were written to.

* ``position`` — the checkpoint's place in the chain, unique: two processes that
  checkpoint at once cannot both follow the same checkpoint (the second one's
  INSERT fails and it re-reads the chain's end). Checkpoints written before this
  revision keep ``NULL`` and are verified in their old format.
* ``kind`` — ``checkpoint`` (heads the trail must still hold) or ``prune`` (how
  far each stream was deleted on purpose, for retention).
* ``anchor`` — the identity of the anchor outside the database that the
  checkpoint was written to, if any: ``charter audit verify`` then requires the
  anchor to hold it, so a truncated anchor is reported.

Revision ID: charter_0005
Revises: charter_0004
"""

import sqlalchemy as sa
from alembic import op

revision = "charter_0005"
down_revision = "charter_0004"
branch_labels = None
depends_on = None

_TABLE = "charter_audit_checkpoints"
_INDEX = "uq_charter_audit_checkpoints_position"


def upgrade() -> None:
    op.add_column(_TABLE, sa.Column("position", sa.BigInteger, nullable=True))
    op.add_column(
        _TABLE,
        sa.Column("kind", sa.String(16), nullable=False, server_default="checkpoint"),
    )
    op.add_column(_TABLE, sa.Column("anchor", sa.String(64), nullable=True))
    # A unique index rather than a constraint: SQLite adds it without rebuilding the table.
    op.create_index(_INDEX, _TABLE, ["position"], unique=True)


def downgrade() -> None:
    op.drop_index(_INDEX, table_name=_TABLE)
    with op.batch_alter_table(_TABLE) as batch:
        batch.drop_column("anchor")
        batch.drop_column("kind")
        batch.drop_column("position")
