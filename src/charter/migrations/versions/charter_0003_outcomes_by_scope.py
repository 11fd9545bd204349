"""Charter: stored outcomes keyed by the key's scope instead of the claim's id.

The gate then needs no ``RETURNING id`` from its claim, and on PostgreSQL the
outcome's scope comes from the audit entry's parameters of the same statement
(see ``charter.idempotency``). Existing outcomes are carried over: each takes
its claim's (tenant, subject, key); an outcome whose claim is gone (there should
be none: purge deletes both) is dropped, as purge would have.

Revision ID: charter_0003
Revises: charter_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "charter_0003"
down_revision = "charter_0002"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
_OUTCOMES = "charter_idempotency_outcomes"
_CARRIED = "resource_id, response_status, response_body, error, outcome, completed_at"


def _outcome_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("resource_id", sa.String(128), nullable=True),
        sa.Column("response_status", sa.Integer, nullable=False),
        sa.Column("response_body", sa.JSON, nullable=True),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "charter_idempotency_outcomes_next",
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        *_outcome_columns(),
        sa.PrimaryKeyConstraint("tenant", "subject", "key", name="pk_charter_idempotency_outcomes"),
    )
    op.execute(
        f"INSERT INTO charter_idempotency_outcomes_next (tenant, subject, key, {_CARRIED}) "
        f"SELECT c.tenant, c.subject, c.key, {_prefixed('o')} "
        f"FROM {_OUTCOMES} o JOIN charter_idempotency c ON c.id = o.claim_id"
    )
    op.drop_table(_OUTCOMES)
    op.rename_table("charter_idempotency_outcomes_next", _OUTCOMES)


def downgrade() -> None:
    op.create_table(
        "charter_idempotency_outcomes_prev",
        sa.Column("claim_id", _ID, primary_key=True, autoincrement=False),
        *_outcome_columns(),
    )
    op.execute(
        f"INSERT INTO charter_idempotency_outcomes_prev (claim_id, {_CARRIED}) "
        f"SELECT c.id, {_prefixed('o')} FROM {_OUTCOMES} o JOIN charter_idempotency c "
        "ON c.tenant = o.tenant AND c.subject = o.subject AND c.key = o.key"
    )
    op.drop_table(_OUTCOMES)
    op.rename_table("charter_idempotency_outcomes_prev", _OUTCOMES)


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{name.strip()}" for name in _CARRIED.split(","))
