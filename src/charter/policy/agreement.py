"""Check that a policy's SQL filter and its Python decision select the same records.

Check and filter paths drift apart in every system that has both. Charter
keeps one rule tree with two compilers and ships the check that they agree,
so that applications can run it against their own rules and data (in a test,
or against a staging copy)::

    from charter.policy import assert_filter_agrees

    def test_invoice_list_filter_matches_decisions(session, actor):
        assert_filter_agrees(session, approve_policy, actor)

It loads every row of the resource's table (mind the size), decides each one
in Python with :meth:`ActionPolicy.is_allowed`, runs the compiled WHERE clause
(with tenant isolation) and compares the two sets of primary keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..errors import ConfigurationError
from .engine import ActionPolicy

__all__ = ["Disagreement", "assert_filter_agrees", "filter_disagreements"]


@dataclass(frozen=True, slots=True)
class Disagreement:
    """One record that the SQL filter and the Python decision treat differently."""

    id: Any
    in_sql: bool
    allowed_in_python: bool
    reason: str

    def __str__(self) -> str:
        return (
            f"id={self.id!r}: sql={'selected' if self.in_sql else 'excluded'}, "
            f"python={'allowed' if self.allowed_in_python else 'denied'} ({self.reason})"
        )


def filter_disagreements(
    session: Session, policy: ActionPolicy, actor: Any, ctx: Any = None
) -> list[Disagreement]:
    """Every record on which the SQL filter and the Python decision of ``policy`` differ."""
    spec = policy.resource
    if spec is None:
        raise ConfigurationError(f"action {policy.action} has no resource to check")
    model = spec.model
    id_column = getattr(model, spec.id)
    selected = set(session.scalars(policy.apply(sa.select(id_column), actor, ctx)))
    out: list[Disagreement] = []
    for record in session.scalars(sa.select(model).order_by(id_column)):
        key = getattr(record, spec.id)
        allowed = policy.is_allowed(actor, record, ctx)
        if allowed != (key in selected):
            decision = policy.decide(actor, record, ctx)
            out.append(Disagreement(key, key in selected, allowed, decision.reason))
    return out


def assert_filter_agrees(
    session: Session, policy: ActionPolicy, actor: Any, ctx: Any = None
) -> None:
    """Fail with the list of disagreeing records when the filter and the decision differ."""
    disagreements = filter_disagreements(session, policy, actor, ctx)
    if disagreements:
        listed = "\n  ".join(str(d) for d in disagreements[:20])
        raise AssertionError(
            f"{policy.action}: the SQL filter disagrees with the Python decision on "
            f"{len(disagreements)} record(s) for actor {actor.id!r}:\n  {listed}\n"
            f"filter: {policy.condition.text()}"
        )
