"""Deciding and explaining: ActionPolicy.decide / is_allowed."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from charter.actor import Actor
from charter.decision import DecisionKind
from charter.policy import A, C, PolicySet, R

from .conftest import make_ctx
from .models import COUNTRIES, INVOICES, Country, Invoice

APPROVE = (
    A.has_role("approver")
    & (R.state == "submitted")
    & (R.amount <= A.approval_limit)
    & (R.created_by != A.id)
)


def invoice(**values: Any) -> Invoice:
    base: dict[str, Any] = {
        "id": 1,
        "tenant_id": "t1",
        "state": "submitted",
        "amount": Decimal("1200"),
        "created_by": "u-clerk",
    }
    return Invoice(**{**base, **values})


def approve_policy(**options: Any) -> Any:
    policy = PolicySet()
    policy.allow("invoice.approve", APPROVE, name="approvers-approve")
    policy.deny("invoice.*", A.kind == "partner", name="no-partners", message="Partners may not.")
    return policy.compile(resource=INVOICES, action="invoice.approve", **options)


def test_allowed_decision_names_the_rule_that_allowed(approver: Actor) -> None:
    decision = approve_policy().decide(approver, invoice(), None)
    assert (
        decision.allowed,
        decision.kind,
        decision.rule,
    ) == (True, DecisionKind.ALLOWED, "approvers-approve")


def test_is_allowed_is_the_boolean_twin_of_decide(approver: Actor) -> None:
    ap = approve_policy()
    for record in (invoice(), invoice(amount=Decimal("9000")), invoice(state="draft")):
        assert ap.decide(approver, record, None).allowed is ap.is_allowed(approver, record, None)


def test_denial_names_each_failed_condition_with_its_values(approver: Actor) -> None:
    decision = approve_policy().decide(
        approver, invoice(amount=Decimal("12000"), state="draft"), None
    )
    assert decision.kind is DecisionKind.NO_RULE
    assert decision.failed == (
        "R.state 'draft' == 'submitted' is false",
        "R.amount 12000 <= A.approval_limit 5000 is false",
    )
    assert "nearest rule approvers-approve" in decision.reason


def test_public_reason_does_not_leak_record_values(approver: Actor) -> None:
    decision = approve_policy().decide(approver, invoice(amount=Decimal("12000")), None)
    assert "12000" in decision.reason
    assert "12000" not in decision.public_reason
    assert decision.public_reason == "You are not allowed to perform invoice.approve."


def test_explicit_deny_wins_over_an_allow() -> None:
    partner = Actor.make(
        "p1", "t1", kind="partner", roles=["approver"], attributes={"approval_limit": 10**6}
    )
    decision = approve_policy().decide(partner, invoice(), None)
    assert (decision.kind, decision.rule) == (DecisionKind.DENIED_BY_RULE, "no-partners")
    assert decision.failed == ("A.kind 'partner' == 'partner' is true",)
    assert decision.public_reason == "Partners may not."


def test_no_rule_for_the_action_denies_by_default(approver: Actor) -> None:
    ap = PolicySet().compile(resource=INVOICES, action="invoice.pay")
    decision = ap.decide(approver, invoice(), None)
    assert (decision.allowed, decision.kind) == (False, DecisionKind.NO_RULE)
    assert decision.reason == "no rule allows invoice.pay (deny by default)"


def test_patterns_apply_to_every_matching_action(approver: Actor) -> None:
    policy = PolicySet()
    policy.allow("*", A.has_role("approver"), name="approvers-anything")
    policy.deny("invoice.*", R.state == "archived", name="archived-frozen")
    pay = policy.compile(resource=INVOICES, action="invoice.pay")
    assert pay.is_allowed(approver, invoice(), None)
    assert not pay.is_allowed(approver, invoice(state="archived"), None)
    other = policy.compile(resource=COUNTRIES, action="country.close")
    assert other.is_allowed(approver, Country(code="FR"), None)


def test_error_during_evaluation_fails_closed_as_error() -> None:
    no_limit = Actor.make("u2", "t1", roles=["approver"])
    ap = approve_policy()
    decision = ap.decide(no_limit, invoice(), None)
    assert (decision.allowed, decision.kind) == (False, DecisionKind.ERROR)
    assert "R.amount 1200 <= A.approval_limit None" in decision.reason
    assert "TypeError" in decision.reason
    assert decision.public_reason == "The request could not be authorized."
    assert ap.is_allowed(no_limit, invoice(), None) is False


def test_missing_record_attribute_fails_closed(approver: Actor) -> None:
    class Other:
        tenant_id = "t1"

    decision = approve_policy().decide(approver, Other(), None)
    assert decision.kind is DecisionKind.ERROR
    assert "AttributeError" in decision.reason


def test_record_of_another_tenant_is_not_found(approver: Actor) -> None:
    decision = approve_policy().decide(approver, invoice(tenant_id="t2"), None)
    assert (decision.kind, decision.public_reason) == (DecisionKind.NOT_FOUND, "Not found.")


def test_no_rule_can_switch_tenant_isolation_off(approver: Actor) -> None:
    policy = PolicySet()
    policy.allow("invoice.read", True, name="everyone-reads")
    ap = policy.compile(resource=INVOICES, action="invoice.read")
    assert ap.is_allowed(approver, invoice(tenant_id="t1"), None)
    assert not ap.is_allowed(approver, invoice(tenant_id="t2"), None)


def test_global_resource_has_no_tenant_check(approver: Actor) -> None:
    policy = PolicySet()
    policy.allow("country.read", True, name="everyone")
    assert policy.compile(resource=COUNTRIES, action="country.read").is_allowed(
        approver, Country(code="FR"), None
    )


def test_missing_scope_denies_even_when_roles_allow() -> None:
    token = Actor.make(
        "u1",
        "t1",
        roles=["approver"],
        scopes=["invoices:read"],
        attributes={"approval_limit": 5000},
    )
    decision = approve_policy(scope="invoices:approve").decide(token, invoice(), None)
    assert (decision.kind, decision.rule) == (DecisionKind.DENIED_BY_RULE, "scope")
    assert "invoices:approve" in decision.public_reason


def test_scope_granted_by_a_wildcard_allows(approver: Actor) -> None:
    assert approve_policy(scope="invoices:approve").is_allowed(approver, invoice(), None)


def test_impersonation_applies_the_subjects_roles_and_attributes() -> None:
    support = Actor.make("s1", "support", kind="support", scopes=["*"])
    subject = Actor.make("u7", "t1", roles=["approver"], attributes={"approval_limit": 5000})
    acting = support.impersonate(subject)
    assert approve_policy().is_allowed(acting, invoice(), None)
    assert not approve_policy().is_allowed(acting, invoice(created_by="u7"), None)


def test_impersonation_is_narrowed_by_the_grant_scopes() -> None:
    support = Actor.make("s1", "support", kind="support", scopes=["invoices:read"])
    subject = Actor.make("u7", "t1", roles=["approver"], attributes={"approval_limit": 5000})
    ap = approve_policy(scope="invoices:approve")
    assert not ap.is_allowed(support.impersonate(subject), invoice(), None)


def test_action_can_forbid_impersonation_outright() -> None:
    support = Actor.make("s1", "support", kind="support", scopes=["*"])
    subject = Actor.make("u7", "t1", roles=["approver"], attributes={"approval_limit": 5000})
    ap = approve_policy(impersonation=False)
    decision = ap.decide(support.impersonate(subject), invoice(), None)
    assert (decision.kind, decision.rule) == (DecisionKind.DENIED_BY_RULE, "no-impersonation")
    assert "s1 acting on behalf of u7" in decision.reason
    assert ap.is_allowed(subject, invoice(), None)


def test_rules_can_refer_to_the_real_actor() -> None:
    policy = PolicySet()
    policy.allow("invoice.note", A.has_role("approver") & (A.real.kind != "support"), name="r")
    ap = policy.compile(resource=INVOICES, action="invoice.note")
    subject = Actor.make("u7", "t1", roles=["approver"])
    support = Actor.make("s1", "support", kind="support")
    assert ap.is_allowed(subject, invoice(), None)
    assert not ap.is_allowed(support.impersonate(subject), invoice(), None)


def test_context_fields_are_readable_in_rules(approver: Actor) -> None:
    policy = PolicySet()
    policy.allow("invoice.remind", (R.due < C.now) & (C.channel == "http"), name="overdue")
    ap = policy.compile(resource=INVOICES, action="invoice.remind")
    from datetime import datetime

    ctx = make_ctx(approver)
    assert ap.is_allowed(approver, invoice(due=datetime(2025, 1, 1)), ctx)
    assert not ap.is_allowed(approver, invoice(due=datetime(2026, 1, 1)), ctx)


def test_plain_callable_decides_and_explains(approver: Actor) -> None:
    def is_small(actor: Actor, record: Invoice, ctx: object) -> bool:
        return record.amount is not None and record.amount < 100

    policy = PolicySet()
    policy.allow("invoice.tag", is_small)
    ap = policy.compile(resource=INVOICES, action="invoice.tag")
    assert ap.is_allowed(approver, invoice(amount=Decimal(5)), None)
    decision = ap.decide(approver, invoice(), None)
    assert decision.failed == ("predicate is_small returned False",)


def test_membership_and_none_checks(approver: Actor) -> None:
    policy = PolicySet()
    policy.allow(
        "invoice.archive",
        R.state.in_(["paid", "void"]) | (R.created_by.is_none() & A.roles.contains("approver")),
        name="archivable",
    )
    ap = policy.compile(resource=INVOICES, action="invoice.archive")
    assert ap.is_allowed(approver, invoice(state="paid"), None)
    assert ap.is_allowed(approver, invoice(created_by=None), None)
    assert not ap.is_allowed(approver, invoice(state="draft"), None)


@pytest.mark.parametrize(
    ("record_amount", "expected"), [(Decimal("5000.00"), True), (Decimal("5000.01"), False)]
)
def test_decimal_boundaries_are_exact(
    approver: Actor, record_amount: Decimal, expected: bool
) -> None:
    assert approve_policy().is_allowed(approver, invoice(amount=record_amount), None) is expected


def test_creating_action_gets_no_record(approver: Actor) -> None:
    policy = PolicySet()
    policy.allow("invoice.create", A.has_role("approver") | A.has_role("clerk"), name="staff")
    ap = policy.compile(resource=INVOICES, action="invoice.create", creates=True)
    assert ap.is_allowed(approver, None, None)


def test_record_condition_on_a_missing_record_fails_closed(approver: Actor) -> None:
    decision = approve_policy().decide(approver, None, None)
    assert decision.kind is DecisionKind.ERROR
