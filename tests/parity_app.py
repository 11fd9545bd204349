"""The channel-parity app: one action, reachable with the same rule on every channel.

``invoice.approve`` on the reference service's invoices table, declared afresh here
so that each channel's own actor is one the rule can mean: it allows an approver
whose ``approval_limit`` covers the amount, whoever that is — the user alice over
HTTP (FastAPI and Flask), the operator ``ops-alice`` from ``charter run`` and
``charter import``, the payment provider through its signed webhook, and the agent
ada acting on behalf of alice over MCP (a grant lets the assistant act for
approvers, for ``invoices:approve`` only). Every one holds exactly the scope
``invoices:approve`` and the limit 1 000, so the same record gets the same
decision, by the same rule, everywhere. ``invoice.get`` (any approver, not an agent
tool) makes the record readable, so one over the limit is refused 403, not concealed.

The handler's effect is visible in the record: it copies the input's
``reference`` into ``charge_id`` and records the subject in ``approved_by``.

``charter run --app tests.parity_app:charter`` builds the Charter on
``CHARTER_DATABASE_URL`` (the CLI's operators are :data:`operators` below).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from charter import A, Actor, Charter, R, Transition
from charter.context import ActionContext
from charter.demo.models import Invoice, InvoiceState
from charter.demo.service import invoice_view

__all__ = [
    "AUDIT_KEYS",
    "LIMIT",
    "RULE",
    "SCOPE",
    "USERS",
    "build",
    "charter",
    "directory",
    "operators",
    "partner",
]

AUDIT_KEYS = {"k1": "test-audit-key-0123456789abcdef"}
SCOPE = "invoices:approve"
LIMIT = 1000
#: The one rule: an approver within their limit (a record over it is denied, on every channel).
RULE = A.has_role("approver") & (R.amount <= A.approval_limit)

USERS: Mapping[tuple[str, str], Actor] = {
    ("acme", "alice"): Actor.make(
        "alice", "acme", roles={"approver"}, attributes={"approval_limit": LIMIT}
    ),
    ("acme", "ada"): Actor.make("ada", "acme", kind="agent", roles={"assistant"}),
}

operators: Mapping[str, Mapping[str, Any]] = {
    "ops-alice": {
        "tenant": "acme",
        "roles": ["approver"],
        "scopes": [SCOPE],
        "attributes": {"approval_limit": LIMIT},
    },
}


def directory(tenant: str, user_id: str) -> Actor | None:
    return USERS.get((tenant, user_id))


def partner(_payload: Mapping[str, Any]) -> Actor:
    """The payment provider as a partner of acme: its webhooks act as it."""
    return Actor.make(
        "payments-provider", "acme", kind="partner", roles={"approver"}, scopes={SCOPE},
        attributes={"approval_limit": LIMIT},
    )  # fmt: skip


class Approve(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str = Field(min_length=1, max_length=64)


def build(charter: Charter) -> Charter:
    """Declare the invoices resource, its approval step and the agent's grant on ``charter``."""
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version",
                     view=invoice_view)  # fmt: skip
    charter.workflow(
        Invoice,
        states=(InvoiceState.SUBMITTED, InvoiceState.APPROVED),
        initial=InvoiceState.SUBMITTED,
        transitions=(Transition("invoice.approve", InvoiceState.SUBMITTED, InvoiceState.APPROVED),),
    )
    charter.allow_impersonation("assistant-for-approvers", by="assistant",
                                of_roles={"approver"}, scopes={SCOPE})  # fmt: skip

    @charter.action("invoice.approve", on=Invoice, input=Approve, allow=RULE, scope=SCOPE,
                    idempotency="optional", agent=True)  # fmt: skip
    def approve(ctx: ActionContext, invoice: Invoice, data: Approve) -> Invoice:
        """Approve a submitted invoice, recording the payment reference."""
        invoice.charge_id = data.reference
        invoice.approved_by = ctx.actor.subject.id
        return invoice

    # A sensitive read any approver may make: a record over their limit is denied 403
    # (readable, not concealed), the same refusal on every channel. Not an agent tool.
    @charter.action("invoice.get", on=Invoice, allow=A.has_role("approver"), scope=SCOPE,
                    sensitive_read=True)  # fmt: skip
    def get(ctx: ActionContext, invoice: Invoice, _: BaseModel) -> dict[str, Any]:
        """Read one invoice (audited)."""
        return invoice_view(invoice)

    return charter


def charter() -> Charter:
    """The parity app on ``CHARTER_DATABASE_URL`` (what ``charter run --app`` loads)."""
    return build(Charter(database_url=os.environ["CHARTER_DATABASE_URL"], audit_keys=AUDIT_KEYS))
