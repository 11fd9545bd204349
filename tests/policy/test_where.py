"""Filtering queries with the same rules: ActionPolicy.where / apply, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from charter.actor import Actor
from charter.policy import A, PolicySet, R

from .models import INVOICES, Invoice, Priority

ROWS: list[dict[str, Any]] = [
    {
        "id": 1,
        "tenant_id": "t1",
        "state": "submitted",
        "amount": Decimal("100.00"),
        "created_by": "u2",
        "qty": 1,
        "paid": True,
        "due": datetime(2025, 1, 1),
        "priority": Priority.HIGH,
        "label": "a",
    },
    {
        "id": 2,
        "tenant_id": "t1",
        "state": "submitted",
        "amount": Decimal("9000.00"),
        "created_by": None,
        "qty": 2,
        "paid": None,
        "due": None,
        "priority": None,
        "label": "B",
    },
    {
        "id": 3,
        "tenant_id": "t1",
        "state": None,
        "amount": None,
        "created_by": "u-approver",
        "qty": 3,
        "paid": False,
        "due": datetime(2026, 1, 1),
        "priority": Priority.LOW,
        "label": "é",
    },
    {
        "id": 4,
        "tenant_id": "t2",
        "state": "submitted",
        "amount": Decimal("1.00"),
        "created_by": "u2",
        "qty": 4,
        "paid": True,
        "due": None,
        "priority": None,
        "label": None,
    },
]


def ids(session: Session, rule: object, actor: Actor, **options: Any) -> list[int]:
    for row in ROWS:
        session.add(Invoice(**row))
    session.commit()
    policy = PolicySet()
    policy.allow("invoice.list", rule, name="r")  # type: ignore[arg-type]
    ap = policy.compile(resource=INVOICES, action="invoice.list", listable=True, **options)
    selected = list(session.scalars(ap.apply(sa.select(Invoice.id), actor).order_by(Invoice.id)))
    python = [
        row.id
        for row in session.scalars(sa.select(Invoice).order_by(Invoice.id))
        if ap.is_allowed(actor, row, None)
    ]
    assert selected == python, "SQL and Python disagree"
    return selected


def test_tenant_isolation_is_part_of_every_filter(session: Session, approver: Actor) -> None:
    assert ids(session, True, approver) == [1, 2, 3]


def test_not_equal_selects_null_like_python(session: Session, approver: Actor) -> None:
    assert ids(session, R.created_by != "u2", approver) == [2, 3]


def test_negated_comparison_keeps_python_null_semantics(session: Session, approver: Actor) -> None:
    assert ids(session, ~(R.state == "submitted"), approver) == [3]


def test_ordering_on_null_is_an_error_even_under_not(session: Session, approver: Actor) -> None:
    # Python raises on None <= 5000: the record is denied whatever ~ and | say.
    assert ids(session, ~(R.amount <= A.approval_limit) | (R.qty == 3), approver) == [2]


def test_error_short_circuits_like_python(session: Session, approver: Actor) -> None:
    assert ids(session, (R.qty == 3) | (R.amount <= A.approval_limit), approver) == [1, 3]


def test_equality_with_none_is_is_null(session: Session, approver: Actor) -> None:
    assert ids(session, R.amount == A.missing_attribute, approver) == [3]


def test_in_never_matches_null_unless_listed(session: Session, approver: Actor) -> None:
    assert ids(session, ~R.state.in_(["submitted"]), approver) == [3]
    assert ids_again(session, R.state.in_(["x", None]), approver) == [3]


def ids_again(session: Session, rule: object, actor: Actor) -> list[int]:
    session.execute(sa.delete(Invoice))
    session.commit()
    return ids(session, rule, actor)


def test_boolean_column_truthiness_matches_python(session: Session, approver: Actor) -> None:
    assert ids(session, ~R.paid, approver) == [2, 3]


def test_actor_only_conditions_fold_to_constants(session: Session, approver: Actor) -> None:
    assert ids(session, A.has_role("nobody") | (R.qty >= 2), approver) == [2, 3]


def test_decimal_datetime_and_enum_values_keep_their_types(
    session: Session, approver: Actor
) -> None:
    rule = (
        (R.priority == Priority.LOW) | (R.due > datetime(2025, 6, 1)) | (R.amount >= Decimal(100))
    )
    # 2: priority is NULL (not LOW), then NULL > datetime raises: an error, denied.
    assert ids(session, rule, approver) == [1, 3]


def test_strings_order_by_code_point_on_every_database(session: Session, approver: Actor) -> None:
    assert ids(session, R.label < "a", approver) == [2]


def test_column_to_column_comparison(session: Session, approver: Actor) -> None:
    assert ids(session, R.created_by != R.state, approver) == [1, 2, 3]


def test_deny_rules_become_and_not(approver: Actor) -> None:
    policy = PolicySet()
    policy.allow("invoice.list", R.state == "submitted", name="a")
    policy.deny("invoice.*", R.amount > 1000, name="d")
    ap = policy.compile(resource=INVOICES, action="invoice.list", listable=True)
    sql = str(ap.where(approver).compile(dialect=postgresql.dialect()))
    assert sql == (
        "policy_invoices.tenant_id = %(param_1)s::VARCHAR "
        # 1000 as a Numeric(12, 2); Decimal("NaN") > 1000 raises in Python (PostgreSQL only)
        "AND policy_invoices.amount <= %(param_2)s AND policy_invoices.amount <> 'NaN' "
        "AND policy_invoices.state = %(param_3)s::VARCHAR"
    )


def test_simple_rule_compiles_to_the_sql_one_would_write(approver: Actor) -> None:
    policy = PolicySet()
    policy.allow("invoice.list", A.has_role("approver") & (R.qty <= A.approval_limit), name="a")
    ap = policy.compile(resource=INVOICES, action="invoice.list", listable=True)
    compiled = ap.where(approver).compile(dialect=postgresql.dialect())
    assert str(compiled) == (
        "policy_invoices.tenant_id = %(param_1)s::VARCHAR "
        "AND policy_invoices.qty <= %(param_2)s::INTEGER"  # Decimal('5000'): the integer 5000
    )
    assert compiled.params == {"param_1": "t1", "param_2": 5000}
