"""Property (hypothesis, SQLite and PostgreSQL): no list page or export ever returns another
tenant's row, a row the in-memory decision denies, or a field hidden from its actor — and,
paged to the end, a list returns exactly the rows the decision allows.

Random invoices, actors and rules (the leaves of ``tests/policy/test_agreement``'s generator,
over the reference service's invoice columns, with ``&``/``|``/``~`` and a deny rule).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert, select

from charter import Actor, Charter
from charter.demo.models import Invoice
from charter.policy import A, R
from charter.policy.expr import Condition
from charter.storage import make_engine
from tests.policy.test_agreement import compare, eq_ops, ops

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
AMOUNTS = [Decimal("0"), Decimal("99.99"), Decimal("100"), Decimal("5000")]

rows = st.lists(
    st.fixed_dictionaries(
        {
            "tenant_id": st.sampled_from(["t1", "t2"]),
            "state": st.sampled_from(["draft", "submitted", "approved"]),
            "amount": st.sampled_from(AMOUNTS),
            "created_by": st.sampled_from(["u1", "u2"]),
            "customer": st.sampled_from(["a", "b", "c"]),
            "bank_account": st.one_of(st.none(), st.just("DE89370400440532013000")),
        }
    ),
    max_size=10,
)
actors = st.builds(
    lambda id, tenant, roles, limit: Actor.make(
        id, tenant, roles=roles, attributes={"limit": limit}, scopes={"invoices:read"}
    ),
    st.sampled_from(["u1", "u2"]),
    st.sampled_from(["t1", "t2"]),
    st.frozensets(st.sampled_from(["approver", "clerk", "finance"])),
    st.sampled_from(AMOUNTS),
)
leaves = st.one_of(
    st.builds(lambda op, v: compare(op, R.amount, v), ops, st.sampled_from(AMOUNTS)),
    st.builds(lambda op: compare(op, R.amount, A.limit), ops),
    st.builds(
        lambda op, v: compare(op, R.state, v), eq_ops, st.sampled_from(["draft", "approved"])
    ),
    st.builds(lambda op: compare(op, R.created_by, A.id), eq_ops),
    st.builds(lambda vs: R.customer.in_(vs), st.lists(st.sampled_from(["a", "b"]), max_size=2)),
    st.just(R.bank_account.is_none()),
    st.builds(lambda role: A.has_role(role), st.sampled_from(["approver", "clerk"])),
)
conditions = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.builds(lambda a, b: a & b, children, children),
        st.builds(lambda a, b: a | b, children, children),
        st.builds(lambda a: ~a, children),
    ),
    max_leaves=4,
)
sorts = st.sampled_from([None, "-id", "amount", "-amount", "customer", "-created_at"])


def declare(charter: Charter, allow: Condition, deny: Condition | None) -> None:
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version",
                     visible={"bank_account": A.has_role("finance")})  # fmt: skip
    if deny is not None:
        charter.deny("invoice.*", deny, name="deny")

    def read(ctx: Any, invoice: Any, data: Any) -> Any:
        return invoice

    charter.action("invoice.read", on=Invoice, allow=allow, sensitive_read=True, listable=True,
                   scope="invoices:read")(read)  # fmt: skip
    charter.action("invoice.dump", on=Invoice, target=None, allow=allow, sensitive_read=True,
                   listable=True, scope="invoices:read", tags={"export"})(read)  # fmt: skip


@SETTINGS
@given(rows=rows, actor=actors, allow=conditions, deny=st.one_of(st.none(), conditions),
       sort=sorts, limit=st.integers(1, 4))  # fmt: skip
def test_lists_and_exports_return_only_allowed_rows_of_the_tenant_and_no_hidden_field(
    database_url: str,
    rows: list[dict[str, Any]],
    actor: Actor,
    allow: Condition,
    deny: Condition | None,
    sort: str | None,
    limit: int,
) -> None:
    engine = make_engine(database_url)
    charter = Charter(engine=engine, development=True, rate_limits=None, checkpoint_interval=None)
    try:
        declare(charter, allow, deny)
        with engine.begin() as conn:
            conn.execute(delete(Invoice))
            if rows:
                at = datetime(2026, 1, 1, tzinfo=UTC)
                conn.execute(insert(Invoice), [
                    {**row, "id": i + 1, "currency": "EUR", "version": 1, "created_at": at}
                    for i, row in enumerate(rows)
                ])  # fmt: skip
        policy = charter.policy_of("invoice.read")
        with charter.session() as session:
            records = list(session.scalars(select(Invoice)))
            allowed = {r.id for r in records if policy.is_allowed(actor, r)}
            assert all(r.tenant_id == actor.tenant_id for r in records if r.id in allowed)
        hidden = "finance" not in actor.roles
        listed: list[int] = []
        after = None
        for _ in range(len(rows) + 2):
            page = charter.list_records(actor, "invoice.read", limit=limit, after=after, sort=sort)
            items = page.items()
            assert not hidden or all("bank_account" not in item for item in items)
            listed += [item["id"] for item in items]
            after = page.next
            if after is None:
                break
        assert sorted(listed) == sorted(allowed)
        assert len(listed) == len(set(listed))  # no row twice across pages
        with charter.export(actor, "invoice.dump", format="jsonl", sort=sort) as stream:
            lines = [json.loads(line) for chunk in stream for line in chunk.splitlines()]
        assert sorted(allowed) == sorted(line["id"] for line in lines)
        assert not hidden or all("bank_account" not in line for line in lines)
        assert {actor.tenant_id} >= {line["tenant_id"] for line in lines}
    finally:
        charter.close()
        engine.dispose()
