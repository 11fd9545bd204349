"""The policy engine inside the gate: one rule set decides, explains, filters and reviews."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from charter import A, Actor, Charter, ConfigurationError, DecisionKind, Forbidden, R
from charter.context import ActionContext
from charter.demo.models import Invoice
from charter.demo.service import build_charter, reference_charter
from charter.testing import assert_filter_agrees, assert_matrix_snapshot, make_actor

from .conftest import AUDIT_KEYS

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.fixture
def demo(database_url: str) -> Charter:
    charter = build_charter(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    yield charter
    charter.engine.dispose()


def seed(charter: Charter, count: int = 60) -> None:
    rng = random.Random(7)
    # Test data in any state: written outside the gate's sessions, whose workflow guard
    # refuses an invoice created in another state than draft (an import).
    with Session(charter.engine) as session:
        for i in range(count):
            session.add(
                Invoice(
                    tenant_id=rng.choice(["acme", "globex"]),
                    customer=f"c{i}",
                    amount=Decimal(rng.choice(["10.00", "4999.99", "5000.00", "5000.01", "90000"])),
                    currency="EUR",
                    state=rng.choice(["draft", "submitted", "approved"]),
                    version=1,
                    created_by=rng.choice(["alice", "bob", "carol", "gary"]),
                    created_at=datetime(2026, 1, 1, tzinfo=UTC),
                )
            )
        session.commit()


BOB = make_actor("bob", "acme", "approver", scopes=["invoices:approve"], approval_limit=5000)
CAROL = make_actor("carol", "acme", "admin", "approver", approval_limit=100000)


@pytest.mark.parametrize(
    "actor",
    [
        BOB,
        CAROL,
        make_actor("alice", "acme", "member"),
        make_actor("gary", "globex", "approver", approval_limit=5000),
    ],
)
@pytest.mark.parametrize("action", ["invoice.approve", "invoice.get"])
def test_the_sql_filter_returns_exactly_what_the_gate_would_allow(demo, actor, action):
    seed(demo)
    with demo.session() as session:
        assert_filter_agrees(session, demo.policy_of(action), actor)


def test_filter_adds_the_rules_and_the_tenant_to_any_query(demo):
    seed(demo)
    with demo.session() as session:
        rows = session.execute(demo.filter(select(Invoice), BOB, "invoice.approve")).scalars().all()
    assert rows
    assert all(
        r.tenant_id == "acme"
        and r.state == "submitted"
        and r.amount <= 5000
        and r.created_by != "bob"
        for r in rows
    )


def test_a_denial_names_each_failed_condition_with_its_values(demo):
    seed(demo, 1)
    with demo.session() as session:
        invoice = session.execute(select(Invoice)).scalar_one()
    invoice.state, invoice.amount, invoice.tenant_id, invoice.created_by = (
        "submitted",
        Decimal("12000.00"),
        "acme",
        "alice",
    )
    decision = demo.policy_of("invoice.approve").decide(BOB, invoice)
    assert (False, DecisionKind.NO_RULE) == (decision.allowed, decision.kind)
    assert "R.amount 12000.00 <= A.approval_limit 5000 is false" in decision.failed
    assert "12000" not in decision.public_reason


def test_allowed_actions_lists_what_is_safe_next_with_reasons(demo):
    seed(demo, 1)
    with demo.session() as session:
        invoice = session.execute(select(Invoice)).scalar_one()
    invoice.state, invoice.tenant_id, invoice.created_by, invoice.amount = (
        "submitted",
        "acme",
        "alice",
        Decimal("10.00"),
    )
    allowed = {name: d.allowed for name, d in demo.allowed_actions(BOB, invoice).items()}
    assert {
        "invoice.submit": False,
        "invoice.approve": True,
        "invoice.get": False,
        "invoice.find_by_charge": False,  # the same rule and scope as invoice.get
        "invoice.pay": False,
        "invoice.mark_paid": False,
        "invoice.void": False,
        "invoice.remind": False,  # needs invoices:write, which BOB's token lacks
    } == allowed


def test_the_reference_permission_matrix_is_pinned():
    matrix = reference_charter().matrix(
        roles=["member", "approver", "admin", "support"], states=["draft", "submitted", "approved"]
    )
    assert_matrix_snapshot(matrix, SNAPSHOTS / "reference_matrix.md")


class _Model(BaseModel):
    model_config = {"extra": "forbid"}


def test_an_explicit_deny_wins_over_every_allow(database_url, disposing):
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    charter.deny(
        "invoice.*", A.kind == "partner", name="no-partners", message="Partners cannot do this."
    )
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version")

    @charter.action("invoice.get", on=Invoice, allow=A.has_role("member"), sensitive_read=True)
    def get(ctx: ActionContext, invoice: Invoice, _: BaseModel) -> dict:
        return {}

    partner = make_actor("p", "acme", "member", kind="partner")
    invoice = Invoice(tenant_id="acme", state="draft", amount=Decimal(1), created_by="x")
    decision = charter.policy_of("invoice.get").decide(partner, invoice)
    assert (DecisionKind.DENIED_BY_RULE, "no-partners", "Partners cannot do this.") == (
        decision.kind,
        decision.rule,
        decision.public_reason,
    )


def test_a_rule_declared_after_its_action_is_refused_at_start_up(database_url, disposing):
    charter = disposing(build_charter(Charter(database_url=database_url, audit_keys=AUDIT_KEYS)))
    with pytest.raises(ConfigurationError, match="declare every rule before"):
        charter.deny("invoice.*", A.kind == "partner")


def test_rules_are_checked_against_the_mapped_columns_at_declaration(database_url, disposing):
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version")
    with pytest.raises(ConfigurationError, match="amout"):
        charter.action("invoice.get", on=Invoice, allow=R.amout <= 5)(lambda c, r, d: None)
    with pytest.raises(ConfigurationError):
        charter.action("invoice.x", on=Invoice, allow=R.amount == "lots")(lambda c, r, d: None)


def test_an_evaluation_error_fails_closed_and_is_audited(database_url, disposing):
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    # conceal=False: the caller sees the 403 of kind ERROR (concealed, it would be a 404).
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version", conceal=False)

    @charter.action(
        "invoice.get", on=Invoice, allow=R.amount <= A.approval_limit, sensitive_read=True
    )
    def get(ctx: ActionContext, invoice: Invoice, _: BaseModel) -> dict:
        return {"id": invoice.id}

    with charter.runtime.sessions() as session:
        session.add(
            Invoice(
                tenant_id="acme",
                customer="c",
                amount=Decimal(1),
                currency="EUR",
                state="draft",
                version=1,
                created_by="x",
                created_at=datetime(2026, 1, 1, tzinfo=UTC),
            )
        )
        session.commit()
    no_limit = make_actor("m", "acme", "member")  # approval_limit missing: None <= 1 raises
    with pytest.raises(Forbidden) as info:
        charter.execute(no_limit, "invoice.get", target=1)
    assert DecisionKind.ERROR == info.value.decision.kind
    assert "error" == charter.history("invoices", 1)[-1]["detail"]["kind"]


def test_impersonation_can_be_forbidden_per_action(database_url, disposing):
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version")

    @charter.action(
        "invoice.get",
        on=Invoice,
        allow=A.has_role("member"),
        sensitive_read=True,
        impersonation=False,
    )
    def get(ctx: ActionContext, invoice: Invoice, _: BaseModel) -> dict:
        return {}

    sam = Actor.make("sam", "acme", kind="support", roles={"support"}, scopes={"*"})
    alice = make_actor("alice", "acme", "member")
    invoice = Invoice(tenant_id="acme", state="draft", amount=Decimal(1), created_by="x")
    assert charter.policy_of("invoice.get").is_allowed(alice, invoice)
    decision = charter.policy_of("invoice.get").decide(sam.impersonate(alice), invoice)
    assert (False, "no-impersonation") == (decision.allowed, decision.rule)
