"""The reference service's rules and actions: multi-tenant invoicing.

Invoices move draft → submitted → approved → payment_pending → paid, or to
void from draft or submitted: a declared workflow (``INVOICE_FLOW``), so a step
out of order is 409 ``invalid_transition`` whoever asks, and the rules below
say only *who* may take each step. Who may do what:

* ``invoice.create`` — any member, approver or admin of the tenant;
* ``invoice.submit`` — the invoice's creator or an admin, while it is a draft;
* ``invoice.approve`` — an approver of the same tenant, not the creator, for an
  amount up to their approval limit, while it is submitted;
* ``invoice.void`` — the invoice's creator or an admin, with a reason, while it is a
  draft or submitted;
* ``invoice.get`` — anyone of the tenant; a sensitive read, audited. The same
  rule filters ``GET /invoices`` in SQL, and the approval rule filters the
  approval queue ``GET /approvals``.

Support staff (``sam``) may act on behalf of members and approvers, with a
reason, for reading and preparing invoices (grant ``support-for-staff``), in a
support session (:mod:`charter.sessions`: 30 minutes by default, at most 2 hours,
revocable by sam or an admin, audited with both identities).

An automated agent (``ada``, kind ``agent``) may act for members and approvers
(grant ``assistant-for-staff``) through the agent channel's tools
(:mod:`charter.integrations.agent`, served over MCP): reading, creating and
submitting invoices directly; voiding one only once the user it acts for has
confirmed the call (``Agent(confirm=True)``).

A plan upgrade is a flow that spans several requests (``UPGRADE_FLOW``):
``plan_upgrade.start`` creates its server-side record, then ``verify``,
``capture`` and ``complete``, each within 15 minutes of the step before; the
terminal step checks that every earlier step was completed, in order. Only the
actor who started an upgrade can see or continue it: its id authorizes nothing.

Each tenant has prepaid credits (``credits.top_up`` by an admin, with a reason;
``credits.balance``). ``invoice.remind`` sends a payment reminder through the
outside sender for ``REMINDER_COST`` credits, held while the message is out:
captured when the sender confirms, released when it fails or the hold expires.
``invoice.export`` streams the invoices the caller may read as CSV or JSON lines
(``GET /invoices/export``), ``EXPORTS_PER_DAY`` times per tenant per day (a
period quota), on the stricter ``export`` rate class.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..actor import Actor
from ..context import ActionContext
from ..credits import Credits, Quota
from ..credits.amounts import MAX_AMOUNT
from ..errors import ConfigurationError, NotFound
from ..exposure import Agent
from ..fields import Amount
from ..gate import Charter
from ..policy import A, C, R
from ..sessions import ImpersonationSessions
from ..workflow import Transition
from .models import Invoice, InvoiceState, PlanUpgrade, UpgradeState
from .payment_client import PaymentClient
from .sender import SenderClient, SenderFailed, SenderNotConfigured

__all__ = [
    "DEMO_USERS",
    "build_charter",
    "directory",
    "invoice_view",
    "payments_partner",
    "reference_charter",
    "upgrade_view",
]

# The demo's user directory (a real service reads its user store).
DEMO_USERS: Mapping[tuple[str, str], Actor] = {
    (a.tenant, a.id): a
    for a in (
        Actor.make("alice", "acme", roles={"member"}),
        Actor.make("bob", "acme", roles={"approver"}, attributes={"approval_limit": 5000}),
        Actor.make(
            "carol", "acme", roles={"admin", "approver"}, attributes={"approval_limit": 100000}
        ),
        Actor.make("sam", "acme", kind="support", roles={"support"}),
        Actor.make("ada", "acme", kind="agent", roles={"assistant"}),  # an automated agent
        Actor.make("fiona", "acme", roles={"member", "finance"}),  # sees bank accounts
        Actor.make("gina", "globex", roles={"member"}),
        Actor.make("gary", "globex", roles={"approver"}, attributes={"approval_limit": 5000}),
    )
}


def directory(tenant: str, user_id: str) -> Actor | None:
    return DEMO_USERS.get((tenant, user_id))


class CreateInvoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer: str = Field(min_length=1, max_length=200)
    amount: Amount  # strict: "1200.00" or 1200; never true, " 5 ", 5.5 or "1e3"
    currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$")
    # The customer's IBAN (ISO 13616 shape): only the finance role reads it back.
    bank_account: str | None = Field(default=None, pattern=r"^[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}$")


class Settle(BaseModel):
    model_config = ConfigDict(extra="forbid")
    charge_id: str = Field(min_length=1, max_length=64)


class Approve(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = Field(default=None, max_length=500)


class StartUpgrade(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan: Literal["pro", "enterprise"]


def upgrade_view(upgrade: PlanUpgrade) -> dict[str, Any]:
    return {
        "id": upgrade.id,
        "plan": upgrade.plan,
        "state": upgrade.state,
        "version": upgrade.version,
        "deadline": None if upgrade.deadline is None else upgrade.deadline.isoformat(),
        "steps": [s["action"] for s in upgrade.steps or ()],
    }


def invoice_view(invoice: Invoice) -> dict[str, Any]:
    return {
        "id": invoice.id,
        "tenant": invoice.tenant_id,
        "customer": invoice.customer,
        "amount": str(invoice.amount),
        "currency": invoice.currency,
        "state": invoice.state,
        "version": invoice.version,
        "created_by": invoice.created_by,
        "submitted_by": invoice.submitted_by,
        "approved_by": invoice.approved_by,
        "charge_id": invoice.charge_id,
        "bank_account": invoice.bank_account,  # finance only: FINANCE_FIELDS
    }


# The rules, once, as data: they decide, explain, filter lists in SQL and fill the matrix.
# Which step is possible in which state is the workflow's (INVOICE_FLOW); who may take it
# is the rules'.
ANY_STAFF = A.has_role("member") | A.has_role("approver") | A.has_role("admin")
CAN_SUBMIT = (R.created_by == A.id) | A.has_role("admin")
CAN_APPROVE = A.has_role("approver") & (R.amount <= A.approval_limit) & (R.created_by != A.id)
CAN_READ = ANY_STAFF | A.has_role("support")
CAN_PAY = A.has_role("admin")
CAN_VOID = (R.created_by == A.id) | A.has_role("admin")
# Only the payment provider, only through its signed webhook, only for the charge we made.
PROVIDER_SETTLES = (
    A.has_role("payments") & (C.channel == "webhook") & (R.charge_id == C.input.charge_id)
)
# A plan upgrade is its starter's alone (the tenant is implied: lookups are tenant-scoped).
OWNS_UPGRADE = R.actor_id == A.id
# Fields only some actors see (charter.policy.visibility): left out of reads, lists,
# exports and bulk results of everyone else, and refused as a sort or filter.
FINANCE_FIELDS = {"bank_account": A.has_role("finance")}

S = InvoiceState
INVOICE_FLOW = (
    Transition("invoice.submit", S.DRAFT, S.SUBMITTED),
    Transition("invoice.approve", S.SUBMITTED, S.APPROVED),
    Transition("invoice.pay", S.APPROVED, S.PAYMENT_PENDING),
    Transition("invoice.mark_paid", S.PAYMENT_PENDING, S.PAID),
    Transition("invoice.void", (S.DRAFT, S.SUBMITTED), S.VOID),
)
U = UpgradeState
STEP_TIME = timedelta(minutes=15)
UPGRADE_FLOW = (
    Transition("plan_upgrade.verify", U.INITIATED, U.VERIFIED),
    Transition("plan_upgrade.capture", U.VERIFIED, U.PAYMENT_CAPTURED),
    Transition(
        "plan_upgrade.complete",
        U.PAYMENT_CAPTURED,
        U.COMPLETE,
        requires=("plan_upgrade.verify", "plan_upgrade.capture"),
    ),
)


def payments_partner(tenant: str) -> Actor:
    """The payment provider, as a partner actor of one tenant (its webhooks act as it)."""
    return Actor.make(
        "payments-provider", tenant, kind="partner", roles={"payments"}, scopes={"invoices:settle"}
    )


def build_charter(
    charter: Charter,
    *,
    payments: PaymentClient | None = None,
    sender: SenderClient | None = None,
) -> Charter:
    charter.resource(
        Invoice, tenant="tenant_id", state="state", version="version", view=invoice_view,
        visible=FINANCE_FIELDS,
    )  # fmt: skip
    charter.workflow(
        Invoice,
        states=(S.DRAFT, S.SUBMITTED, S.APPROVED, S.PAYMENT_PENDING, S.PAID, S.VOID),
        initial=S.DRAFT,
        transitions=INVOICE_FLOW,
    )
    # Support may act for members and approvers (never for an admin), to read and to
    # prepare invoices. Approving on someone's behalf needs invoices:approve, which is
    # not granted; paying needs an admin, whom support cannot act for.
    charter.allow_impersonation(
        "support-for-staff",
        by="support",
        of_roles={"member", "approver"},
        scopes={"invoices:read", "invoices:write"},
    )
    # The assistant agent acts for the same people, for the same scopes, through its
    # tools only (the agent channel): delegation is a grant like support's.
    charter.allow_impersonation(
        "assistant-for-staff",
        by="assistant",
        of_roles={"member", "approver"},
        scopes={"invoices:read", "invoices:write"},
    )
    # Support sessions under that grant (support.session.*; the app gives them a signer).
    ImpersonationSessions(charter, directory=directory)

    @charter.action(
        "invoice.create",
        on=Invoice,
        input=CreateInvoice,
        creates=True,
        allow=ANY_STAFF,
        scope="invoices:write",
        idempotency="optional",
        bulk="per_item",  # POST /invoices/bulk: each invoice its own transaction
        agent=True,
    )
    def create(ctx: ActionContext, _: None, data: CreateInvoice) -> Invoice:
        """Create a draft invoice."""
        assert ctx.session is not None
        invoice = Invoice(
            customer=data.customer,
            amount=data.amount,
            currency=data.currency,
            state=InvoiceState.DRAFT,
            version=1,
            created_by=ctx.actor.subject.id,
            created_at=ctx.now,
            bank_account=data.bank_account,
        )
        ctx.session.add(invoice)
        return invoice

    @charter.action(
        "invoice.submit", on=Invoice, allow=CAN_SUBMIT, scope="invoices:write", agent=True
    )
    def submit(ctx: ActionContext, invoice: Invoice, _: BaseModel) -> Invoice:
        """Submit a draft invoice for approval (the gate moves it to submitted)."""
        invoice.submitted_by = ctx.actor.subject.id
        return invoice

    @charter.action(
        "invoice.approve",
        on=Invoice,
        input=Approve,
        allow=CAN_APPROVE,
        scope="invoices:approve",
        idempotency="optional",
        listable=True,
        bulk="all_or_nothing",  # POST /invoices/bulk-approve: every invoice, or none
    )
    def approve(ctx: ActionContext, invoice: Invoice, _: Approve) -> Invoice:
        """Approve a submitted invoice (the gate moves it to approved)."""
        invoice.approved_by = ctx.actor.subject.id
        return invoice

    @charter.action(
        "invoice.get",
        on=Invoice,
        allow=CAN_READ,
        sensitive_read=True,
        scope="invoices:read",
        listable=True,
        agent=True,  # a read-only tool
    )
    def get(ctx: ActionContext, invoice: Invoice, _: BaseModel) -> dict[str, Any]:
        """Read one invoice (audited)."""
        return invoice_view(invoice)

    @charter.action(
        "invoice.find_by_charge",
        on=Invoice,
        by="charge_id",
        allow=CAN_READ,
        sensitive_read=True,
        scope="invoices:read",
    )
    def find_by_charge(ctx: ActionContext, invoice: Invoice, _: BaseModel) -> dict[str, Any]:
        """Find the invoice a provider's charge id belongs to (audited; support's lookup)."""
        return invoice_view(invoice)

    @charter.action(
        "invoice.pay",
        on=Invoice,
        allow=CAN_PAY,
        scope="invoices:write",
        idempotency="required",
        rate="financial",  # stricter than a write, and refused (503) while Redis is down
        # It moves money: tagged so (charter check holds it to that), and never on behalf
        # of someone (support cannot act for an admin anyway; this says so in the rules).
        tags={"financial"},
        impersonation=False,
    )
    def pay(ctx: ActionContext, invoice: Invoice, _: BaseModel) -> Invoice:
        """Charge an approved invoice through the payment provider (exactly once)."""
        if payments is None:
            raise ConfigurationError("the reference service runs without a payment provider")
        # The gate moved it to payment_pending; phase 1 commits that with a recovery point.
        amount, currency = invoice.amount, invoice.currency
        reference = f"{invoice.tenant_id}:{invoice.id}"
        charge = ctx.external(
            "charge",
            lambda key: payments.charge(amount, currency, reference, idempotency_key=key).id,
        )
        invoice.charge_id = charge  # final phase: waits for the provider's payment.settled
        return invoice

    @charter.action(
        "invoice.mark_paid",
        on=Invoice,
        input=Settle,
        allow=PROVIDER_SETTLES,
        scope="invoices:settle",
        idempotency="required",
    )
    def mark_paid(ctx: ActionContext, invoice: Invoice, _: Settle) -> Invoice:
        """The provider confirms the charge (webhook payment.settled); the gate marks it paid."""
        invoice.paid_at = ctx.now
        return invoice

    # An agent's void waits for the user's confirmation (charter.confirmations).
    @charter.action(
        "invoice.void", on=Invoice, allow=CAN_VOID, scope="invoices:write", reason_required=True,
        agent=Agent(confirm=True, description="Void a draft or submitted invoice (a person "
                    "confirms it first)."),
    )  # fmt: skip
    def void(ctx: ActionContext, invoice: Invoice, _: BaseModel) -> Invoice:
        """Void a draft or submitted invoice, with a reason (the gate moves it to void)."""
        return invoice

    _plan_upgrades(charter)
    _credits(charter, sender)
    return charter


def _plan_upgrades(charter: Charter) -> None:
    """The plan-upgrade flow: a server-side record, each step an action (see the docstring)."""
    charter.resource(
        PlanUpgrade, tenant="tenant_id", state="state", version="version", view=upgrade_view
    )
    charter.workflow(
        PlanUpgrade,
        states=(U.INITIATED, U.VERIFIED, U.PAYMENT_CAPTURED, U.COMPLETE),
        initial=U.INITIATED,
        transitions=UPGRADE_FLOW,
        deadline="deadline",
        expires={U.INITIATED: STEP_TIME, U.VERIFIED: STEP_TIME, U.PAYMENT_CAPTURED: STEP_TIME},
        log="steps",
    )
    scope = "plan:upgrade"

    @charter.action("plan_upgrade.start", on=PlanUpgrade, input=StartUpgrade, creates=True,
                    allow=ANY_STAFF, scope=scope)  # fmt: skip
    def start(ctx: ActionContext, _: None, data: StartUpgrade) -> PlanUpgrade:
        """Start an upgrade: the flow's record, owned by its actor (the gate sets its deadline)."""
        assert ctx.session is not None
        upgrade = PlanUpgrade(
            id=secrets.token_hex(16), actor_id=ctx.actor.subject.id, plan=data.plan,
            version=1, created_at=ctx.now,
        )  # fmt: skip
        ctx.session.add(upgrade)
        return upgrade

    @charter.action("plan_upgrade.get", on=PlanUpgrade, allow=OWNS_UPGRADE,
                    sensitive_read=True, scope=scope)  # fmt: skip
    def get_upgrade(ctx: ActionContext, upgrade: PlanUpgrade, _: BaseModel) -> dict[str, Any]:
        """Read one's own upgrade (audited)."""
        return upgrade_view(upgrade)

    def step(ctx: ActionContext, upgrade: PlanUpgrade, _: BaseModel) -> PlanUpgrade:
        """One step of the flow: the gate checks order and deadline and records it."""
        return upgrade

    for name in ("plan_upgrade.verify", "plan_upgrade.capture", "plan_upgrade.complete"):
        charter.action(name, on=PlanUpgrade, allow=OWNS_UPGRADE, scope=scope)(step)


def reference_charter() -> Charter:
    """The reference service's declarations on an in-memory database (for review tools)."""
    return build_charter(Charter(database_url="sqlite://", development=True))


# -- prepaid credits and the export quota ---------------------------------------------------

#: What one invoice reminder costs, in credits (the tenant's prepaid ``credits`` account).
REMINDER_COST = 5
#: How long a reminder's credits stay held while the sender has it: well past the
#: request's recovery lease, so a resumed request still finds its hold.
REMINDER_HOLD = timedelta(minutes=10)
#: Exports per tenant per UTC day.
EXPORTS_PER_DAY = 20


class TopUp(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Strictly a JSON integer of credits: the ledger refuses 0, negatives and absurd sums.
    credits: int = Field(strict=True, gt=0, le=MAX_AMOUNT)


def _credits(charter: Charter, sender: SenderClient | None) -> None:
    """Prepaid credits per tenant, a reminder that holds them, and a daily export quota."""
    credits = Credits.of(charter)

    @charter.action("credits.top_up", input=TopUp, allow=A.has_role("admin"),
                    scope="credits:write", tags={"admin"}, reason_required=True)  # fmt: skip
    def top_up(ctx: ActionContext, _: None, data: TopUp) -> dict[str, Any]:
        """Add prepaid credits to the tenant's account (an admin, with a reason)."""
        tenant = ctx.actor.tenant_id
        credits.open(tenant, ctx=ctx)
        return {"balance": credits.grant(tenant, data.credits, ctx=ctx)}

    @charter.action("credits.balance", allow=ANY_STAFF, sensitive_read=True,
                    scope="invoices:read")  # fmt: skip
    def balance(ctx: ActionContext, _: None, __: BaseModel) -> dict[str, Any]:
        """The tenant's prepaid credits: available and held by reminders in flight."""
        tenant = ctx.actor.tenant_id
        try:
            return {
                "available": credits.balance(tenant),
                "held": credits.balance(tenant, "credits@held"),
            }
        except NotFound:
            return {"available": 0, "held": 0}

    # It spends the tenant's credits and cannot be unsent: never on someone's behalf.
    @charter.action("invoice.remind", on=Invoice, allow=ANY_STAFF, scope="invoices:write",
                    idempotency="required", tags={"financial", "irreversible"},
                    impersonation=False)  # fmt: skip
    def remind(ctx: ActionContext, invoice: Invoice, _: BaseModel) -> dict[str, Any]:
        """Send a payment reminder through the outside sender; its credits are held meanwhile.

        Phase 1 commits the hold with the step's recovery point; the sender's
        confirmation captures it, its failure releases it, and a crash in between
        leaves it to expire, when Charter releases it.
        """
        if sender is None:  # a refusal, not a crash: nothing is held or charged
            raise SenderNotConfigured(
                "this service has no reminder sender (CHARTER_SENDER_URL): nothing was sent"
            )
        hold = credits.hold(ctx, REMINDER_COST, name="reminder", expires_in=REMINDER_HOLD)
        to, text = invoice.customer, f"Invoice {invoice.id}: {invoice.amount} {invoice.currency}"
        try:
            message = ctx.external("send", lambda key: sender.send(to, text, idempotency_key=key))
        except SenderFailed:
            credits.release(ctx, hold)
            return {"sent": False, "charged": 0, "invoice": invoice.id}
        credits.capture(ctx, hold)
        return {"sent": True, "message": message, "charged": hold.amount, "invoice": invoice.id}

    @charter.action("invoice.export", on=Invoice, target=None, listable=True, allow=ANY_STAFF,
                    sensitive_read=True, scope="invoices:read", tags={"export"},
                    cost=Quota("exports", limit=EXPORTS_PER_DAY, per="day"))  # fmt: skip
    def export(ctx: ActionContext, _: None, __: BaseModel) -> dict[str, Any]:
        """Stream the invoices the caller may read (charter.export: GET /invoices/export)."""
        raise ConfigurationError("invoice.export is streamed by charter.export, not executed")
