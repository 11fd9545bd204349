"""The expression language: readable reprs, refusal of truthiness, namespaces."""

from __future__ import annotations

import pytest

from charter.policy import A, C, R
from charter.policy.expr import And, Compare, In, Ref


def test_expressions_read_like_the_source() -> None:
    rule = A.has_role("approver") & (R.state == "submitted") & (R.amount <= A.approval_limit)
    assert repr(rule) == (
        "A.has_role('approver') & (R.state == 'submitted') & (R.amount <= A.approval_limit)"
    )


def test_combinators_flatten_and_render_not_and_membership() -> None:
    rule = ~(R.state.in_(["a", "b"])) | R.created_by.is_not_none() | A.roles.contains("x")
    assert repr(rule) == (
        "~(R.state.in_(['a', 'b'])) | R.created_by.is_not_none() | A.roles.contains('x')"
    )


def test_and_of_ands_is_one_flat_node() -> None:
    rule = (R.a == 1) & (R.b == 2) & (R.c == 3)
    assert isinstance(rule, And)
    assert len(rule.items) == 3


def test_using_an_expression_as_a_bool_is_refused() -> None:
    with pytest.raises(TypeError, match="no truth value"):
        bool(R.amount <= 5)
    with pytest.raises(TypeError):
        (R.amount <= 5) and (R.state == "x")


def test_actor_references_resolve_subject_real_and_impersonation() -> None:
    assert (A.id.root, A.id.path) == ("A", ("id",))
    assert (A.real.id.root, A.real.id.path) == ("A.real", ("id",))
    assert repr(A.impersonating) == "A.impersonating"
    with pytest.raises(AttributeError, match=r"A\.real\.limit"):
        _ = A.real.limit


def test_context_input_fields_nest() -> None:
    assert repr(C.input.amount > 5) == "C.input.amount > 5"
    assert repr(C.input["text"]) == "C.input.text"


def test_constant_on_the_left_builds_a_reflected_comparison() -> None:
    node = R.amount > 5
    assert isinstance(node, Compare)
    assert (node.op, repr(node.left)) == (">", "R.amount")


def test_in_refuses_a_plain_string() -> None:
    with pytest.raises(TypeError):
        R.state.in_("abc")
    assert isinstance(R.state.in_(A.regions), In)
    assert isinstance(R.state.in_(A.regions).options, Ref)
