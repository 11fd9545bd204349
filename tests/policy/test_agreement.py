"""Property: the SQL filter selects exactly the records the Python decision allows.

Random records, actors and rules (comparisons, membership, None checks,
truthiness, actor- and context-only parts, ``&``/``|``/``~``, deny rules),
checked with :func:`charter.policy.assert_filter_agrees` on SQLite and on
PostgreSQL. Derandomized, so a run is reproducible.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from charter.actor import Actor
from charter.errors import ConfigurationError
from charter.policy import A, C, PolicySet, R, assert_filter_agrees, filter_disagreements
from charter.policy.expr import Condition

from .conftest import NOW, make_ctx
from .models import INVOICES, Invoice, Priority

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

amounts = st.one_of(
    st.none(),
    st.sampled_from(
        [Decimal("0"), Decimal("99.99"), Decimal("100"), Decimal("5000"), Decimal("5000.01")]
    ),
)
states = st.sampled_from([None, "draft", "submitted", "approved", "Approved", "é"])
people = st.sampled_from([None, "u1", "u2"])
dues = st.one_of(st.none(), st.sampled_from([NOW - timedelta(days=1), NOW, NOW + timedelta(1)]))

records = st.lists(
    st.fixed_dictionaries(
        {
            "tenant_id": st.sampled_from(["t1", "t2"]),
            "state": states,
            "amount": amounts,
            "created_by": people,
            "qty": st.integers(-2, 3),
            "paid": st.one_of(st.none(), st.booleans()),
            "due": dues,
            "priority": st.one_of(st.none(), st.sampled_from(list(Priority))),
            "label": states,
        }
    ),
    max_size=12,
)

actors = st.builds(
    lambda id, tenant, roles, limit, labels: Actor.make(
        id, tenant, roles=roles, attributes={"limit": limit, "labels": labels}
    ),
    st.sampled_from(["u1", "u2"]),
    st.sampled_from(["t1", "t2"]),
    st.frozensets(st.sampled_from(["approver", "clerk"])),
    amounts,
    st.one_of(st.none(), st.lists(states, max_size=3)),
)

ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
eq_ops = st.sampled_from(["==", "!="])


def compare(op: str, left: Any, right: Any) -> Condition:
    table = {
        "==": lambda: left == right,
        "!=": lambda: left != right,
        "<": lambda: left < right,
        "<=": lambda: left <= right,
        ">": lambda: left > right,
        ">=": lambda: left >= right,
    }
    return table[op]()  # type: ignore[no-any-return]


leaves = st.one_of(
    st.builds(lambda op, v: compare(op, R.amount, v), ops, amounts.filter(lambda v: v is not None)),
    st.builds(lambda op: compare(op, R.amount, A.limit), ops),
    st.builds(lambda op, v: compare(op, R.qty, v), ops, st.integers(-1, 2)),
    st.builds(lambda op: compare(op, R.qty, A.limit), ops),
    st.builds(lambda op, v: compare(op, R.state, v), ops, states.filter(lambda v: v is not None)),
    st.builds(lambda op, v: compare(op, R.state, v), eq_ops, states),
    st.builds(lambda op: compare(op, R.created_by, A.id), eq_ops),
    st.builds(lambda op: compare(op, R.label, R.state), ops),
    st.builds(lambda op: compare(op, R.due, C.now), ops),
    st.builds(
        lambda op, v: compare(op, R.priority, v),
        eq_ops,
        st.one_of(st.none(), st.sampled_from(list(Priority))),
    ),
    st.builds(lambda vs: R.state.in_(vs), st.lists(states, max_size=3)),
    st.just(R.label.in_(A.labels)),
    st.builds(lambda v: R.paid == v, st.one_of(st.none(), st.booleans())),
    st.just(R.amount.is_none()),
    st.just(R.paid & A.has_role("clerk")),
    st.builds(lambda role: A.has_role(role), st.sampled_from(["approver", "clerk"])),
    st.just(A.limit > 100),
)

conditions = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.builds(lambda a, b: a & b, children, children),
        st.builds(lambda a, b: a | b, children, children),
        st.builds(lambda a: ~a, children),
    ),
    max_leaves=6,
)


def build_policy(allows: list[Condition], denies: list[Condition]) -> Any:
    policy = PolicySet()
    for i, rule in enumerate(allows):
        policy.allow("invoice.list", rule, name=f"allow-{i}")
    for i, rule in enumerate(denies):
        policy.deny("invoice.*", rule, name=f"deny-{i}")
    return policy.compile(resource=INVOICES, action="invoice.list", listable=True)


@SETTINGS
@given(
    rows=records,
    actor=actors,
    allows=st.lists(conditions, min_size=1, max_size=2),
    denies=st.lists(conditions, max_size=1),
)
def test_sql_filter_selects_exactly_what_python_allows(
    session: Session,
    rows: list[dict[str, Any]],
    actor: Actor,
    allows: list[Condition],
    denies: list[Condition],
) -> None:
    session.query(Invoice).delete()
    session.add_all(Invoice(id=i + 1, **row) for i, row in enumerate(rows))
    session.commit()
    session.expire_all()
    assert_filter_agrees(session, build_policy(allows, denies), actor, make_ctx(actor))


def test_agreement_check_reports_a_disagreeing_record(session: Session, approver: Actor) -> None:
    session.add(Invoice(id=1, tenant_id="t1", state="submitted", qty=1))
    session.commit()
    ap = build_policy([R.state == "submitted"], [])
    ap._is_allowed = lambda actor, record, ctx: False  # simulate a drifted compiler
    found = filter_disagreements(session, ap, approver)
    assert [(d.id, d.in_sql, d.allowed_in_python) for d in found] == [(1, True, False)]
    with pytest.raises(AssertionError, match="disagrees with the Python decision on 1 record"):
        assert_filter_agrees(session, ap, approver)


def test_ambiguous_runtime_value_is_refused_not_guessed(session: Session) -> None:
    actor = Actor.make("u1", "t1", attributes={"limit": True})
    with pytest.raises(ConfigurationError, match="cannot compare column qty with bool"):
        build_policy([R.qty == A.limit], []).where(actor)
