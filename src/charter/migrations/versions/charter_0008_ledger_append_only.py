"""Charter: the ledger is append-only in the database itself — UPDATE and DELETE are refused.

The application never changes or removes a ledger row (a refund is a new
movement); these triggers make that a property of the table, so a handler, a
script or a tool that reaches the table directly cannot rewrite history. A
privileged operator can still drop the trigger; ``charter credits verify``
catches what that allows (a balance that disagrees with its ledger).

Revision ID: charter_0008
Revises: charter_0007
"""

from alembic import op

revision = "charter_0008"
down_revision = "charter_0007"
branch_labels = None
depends_on = None

_MESSAGE = "charter_ledger is append-only: record a new movement instead"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION charter_ledger_append_only() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ "
            f"BEGIN RAISE EXCEPTION '{_MESSAGE}' USING ERRCODE = 'restrict_violation'; END $$"
        )
        op.execute(
            "CREATE TRIGGER charter_ledger_append_only BEFORE UPDATE OR DELETE ON charter_ledger "
            "FOR EACH ROW EXECUTE FUNCTION charter_ledger_append_only()"
        )
        return
    for event in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER charter_ledger_no_{event.lower()} BEFORE {event} ON charter_ledger "
            f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER charter_ledger_append_only ON charter_ledger")
        op.execute("DROP FUNCTION charter_ledger_append_only()")
        return
    for event in ("update", "delete"):
        op.execute(f"DROP TRIGGER charter_ledger_no_{event}")
