"""What is safe next: allowed_actions over a resource's compiled action policies."""

from __future__ import annotations

from decimal import Decimal

from charter.actor import Actor
from charter.decision import DecisionKind
from charter.policy import A, PolicySet, R, allowed_actions

from .models import INVOICES, Invoice


def build() -> PolicySet:
    policy = PolicySet()
    policy.allow("invoice.approve", A.has_role("approver") & (R.state == "submitted"), name="ap")
    policy.allow("invoice.pay", A.has_role("payer") & (R.state == "approved"), name="pay")
    policy.allow("invoice.read", True, name="read")
    for action in ("invoice.approve", "invoice.pay", "invoice.read"):
        policy.compile(resource=INVOICES, action=action)
    return policy


def test_allowed_actions_lists_every_action_with_its_decision(approver: Actor) -> None:
    record = Invoice(id=1, tenant_id="t1", state="submitted", amount=Decimal(1))
    result = build().allowed_actions(INVOICES, approver, record)
    assert {action: decision.allowed for action, decision in result.items()} == {
        "invoice.approve": True,
        "invoice.pay": False,
        "invoice.read": True,
    }
    assert result["invoice.pay"].kind is DecisionKind.NO_RULE
    assert result["invoice.pay"].failed == (
        "A.has_role('payer') with roles {'approver'} is false",
        "R.state 'submitted' == 'approved' is false",
    )


def test_allowed_actions_function_takes_any_policies(approver: Actor) -> None:
    policy = build()
    record = Invoice(id=1, tenant_id="t2", state="submitted")
    result = allowed_actions(policy.compiled(INVOICES), approver, record)
    assert all(d.kind is DecisionKind.NOT_FOUND for d in result.values())
