"""Rules are validated when an action is compiled, against the resource's mapped columns."""

from __future__ import annotations

from decimal import Decimal

import pytest

from charter.errors import ConfigurationError
from charter.policy import A, C, PolicySet, R

from .models import INVOICES, Priority


def compile_with(rule: object, **options: object) -> object:
    policy = PolicySet()
    policy.allow("invoice.x", rule, name="rule-under-test")  # type: ignore[arg-type]
    return policy.compile(resource=INVOICES, action="invoice.x", **options)  # type: ignore[arg-type]


def test_unknown_record_attribute_is_refused_with_the_columns() -> None:
    with pytest.raises(ConfigurationError, match=r"R.amout is not a column of invoice.*amount"):
        compile_with(R.amout > 5)


@pytest.mark.parametrize(
    "rule",
    [R.amount == "5", R.state == 5, R.state.in_(["a", 3]), R.due < "2024-01-01", R.paid == 1],
    ids=["numeric-vs-str", "string-vs-int", "in-mixed", "datetime-vs-str", "bool-vs-int"],
)
def test_obvious_type_mismatches_are_refused(rule: object) -> None:
    with pytest.raises(ConfigurationError, match=r"rule-under-test.*compares"):
        compile_with(rule)


def test_matching_types_are_accepted() -> None:
    compile_with((R.amount > Decimal(5)) & (R.qty >= 2) & (R.priority == Priority.HIGH))


def test_enum_column_compared_with_its_string_value_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="priority"):
        compile_with(R.priority == "high")


def test_ordering_an_enum_column_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="enums support"):
        compile_with(R.priority < Priority.HIGH)


def test_ordering_against_none_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="is_none"):
        compile_with(R.amount < None)


def test_unknown_context_field_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"C\.nowz is not a context field"):
        compile_with(C.nowz > 5)


def test_listable_action_refuses_a_plain_callable() -> None:
    with pytest.raises(ConfigurationError, match=r"listable.*cannot filter a query"):
        compile_with(lambda actor, record, ctx: True, listable=True)


def test_listable_action_refuses_truthiness_of_a_non_boolean_column() -> None:
    with pytest.raises(ConfigurationError, match="truthiness"):
        compile_with(R.amount & A.has_role("x"), listable=True)


def test_non_listable_action_accepts_a_callable_but_refuses_to_filter() -> None:
    ap = compile_with(lambda actor, record, ctx: True)
    with pytest.raises(ConfigurationError, match="cannot filter"):
        ap.where(None)  # type: ignore[attr-defined]


def test_creating_action_refuses_record_references() -> None:
    with pytest.raises(ConfigurationError, match="creates one"):
        compile_with(R.amount < 5, creates=True)


def test_rule_declared_after_its_action_was_compiled_is_refused() -> None:
    policy = PolicySet()
    policy.allow("invoice.approve", A.has_role("approver"), name="a")
    policy.compile(resource=INVOICES, action="invoice.approve")
    with pytest.raises(ConfigurationError, match=r"after invoice\.approve was compiled"):
        policy.deny("invoice.*", A.kind == "partner", name="late")


def test_duplicate_rule_names_are_refused() -> None:
    policy = PolicySet()
    policy.allow("invoice.a", True, name="same")
    with pytest.raises(ConfigurationError, match="already used"):
        policy.allow("invoice.b", True, name="same")


def test_compile_is_cached_per_resource_and_action() -> None:
    policy = PolicySet()
    policy.allow("invoice.a", True, name="r")
    first = policy.compile(resource=INVOICES, action="invoice.a")
    assert policy.compile(resource=INVOICES, action="invoice.a") is first
    with pytest.raises(ConfigurationError, match="other options"):
        policy.compile(resource=INVOICES, action="invoice.a", scope="x")
