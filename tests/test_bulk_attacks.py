"""Regressions from an attack run on bulk actions, replays and rate limits (SQLite, PostgreSQL).

* a stored replay (single call, per-item batch, all-or-nothing batch; warm from the
  outcome cache or cold from the database) is redacted for the actor asking *now*;
* every batch item counts against the rate limits as its single call, an invalid one
  too, and a stored batch's replay counts one call per item;
* a failed all-or-nothing batch audits no state the batch itself produced.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from charter import A, Actor, BatchFailed, Charter, RateLimited
from charter.audit import audit_table
from charter.context import ActionContext
from charter.idempotency.store import idempotency_table
from charter.ratelimit import RateClass, RateLimiter

from .app import Doc, is_member
from .conftest import AUDIT_KEYS

FINANCE = A.has_role("finance")


class Make(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=200)


def is_draft(actor: Any, record: Any, ctx: ActionContext) -> bool:
    return bool(record.state == "draft")


def build(url: str, *, rate_limits: Any = None) -> Charter:
    """The test documents, whose ``amount`` only the finance role sees."""
    charter = Charter(database_url=url, audit_keys=AUDIT_KEYS, rate_limits=rate_limits)
    charter.resource(
        Doc, tenant="tenant_id", state="state", version="version", visible={"amount": FINANCE}
    )

    def mark(ctx: ActionContext, doc: Doc, _: BaseModel) -> dict[str, Any]:
        doc.counter += 1
        return {"id": doc.id, "amount": str(doc.amount), "counter": doc.counter}

    def approve(ctx: ActionContext, doc: Doc, _: BaseModel) -> dict[str, Any]:
        doc.state = "approved"
        return {"id": doc.id, "amount": str(doc.amount), "state": doc.state}

    def make(ctx: ActionContext, _: None, data: Make) -> dict[str, Any]:
        doc = Doc(title=data.title, created_by=ctx.actor.subject.id)
        assert ctx.session is not None
        ctx.session.add(doc)
        return {"title": doc.title}

    charter.action("doc.mark", on=Doc, allow=is_member, bulk="per_item")(mark)
    charter.action("doc.mark_all", on=Doc, allow=is_member, bulk="all_or_nothing")(mark)
    charter.action("doc.approve_all", on=Doc, allow=is_draft, bulk="all_or_nothing")(approve)
    charter.action("doc.make", on=Doc, input=Make, creates=True, allow=is_member, bulk="per_item")(
        make
    )
    charter.action(
        "doc.make_all", on=Doc, input=Make, creates=True, allow=is_member, bulk="all_or_nothing"
    )(make)
    return charter


def create_doc(charter: Charter, actor: Actor, title: str) -> int:
    """A draft of ``actor``'s tenant, written directly (no call counted)."""
    with charter.session() as session:
        doc = Doc(
            tenant_id=actor.tenant_id, title=title, amount=Decimal("12.50"),
            created_by=actor.subject.id,
        )  # fmt: skip
        session.add(doc)
        session.commit()
        return int(doc.id)


def limited(writes: int) -> RateLimiter:
    return RateLimiter("memory://", classes=[RateClass("write", f"{writes}/hour")])


def keys_stored(charter: Charter) -> int:
    with charter.engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(idempotency_table)).scalar_one())


# -- A: a replay is redacted for the actor asking now -------------------------------------


@pytest.fixture
def victor() -> Actor:
    return Actor.make("victor", "acme", roles={"member", "finance"})


@pytest.fixture
def victor_now() -> Actor:
    """Victor after he left finance: his directory entry no longer has the role."""
    return Actor.make("victor", "acme", roles={"member"})


def test_a_replayed_single_call_leaves_out_a_field_its_actor_can_no_longer_see(
    database_url: str, victor: Actor, victor_now: Actor, disposing: Callable[[Charter], Charter]
) -> None:
    charter = disposing(build(database_url))
    doc = create_doc(charter, victor, "d")
    first = charter.execute(victor, "doc.mark", target=doc, key="mark-1")
    assert "amount" in first.body
    warm = charter.execute(victor_now, "doc.mark", target=doc, key="mark-1")  # outcome cache
    assert warm.replayed
    assert "amount" not in warm.body
    assert {"id": doc, "counter": 1} == warm.body
    cold = disposing(build(database_url))  # another process: no outcome cache, the database
    again = cold.execute(victor_now, "doc.mark", target=doc, key="mark-1")
    assert again.replayed
    assert {"id": doc, "counter": 1} == again.body
    # Still the stored answer for whoever may see it: a replay is never redacted for another.
    assert "amount" in cold.execute(victor, "doc.mark", target=doc, key="mark-1").body


@pytest.mark.parametrize("action", ["doc.mark", "doc.mark_all"])
def test_a_replayed_batch_leaves_out_a_field_its_actor_can_no_longer_see(
    database_url: str,
    victor: Actor,
    victor_now: Actor,
    action: str,
    disposing: Callable[[Charter], Charter],
) -> None:
    charter = disposing(build(database_url))
    ids = [create_doc(charter, victor, f"d{i}") for i in range(2)]
    first = charter.execute_many(victor, action, ids, key="batch-1")
    assert all("amount" in item.body for item in first.items)
    for gate in (charter, disposing(build(database_url))):  # this process, then another
        replay = gate.execute_many(victor_now, action, ids, key="batch-1")
        assert replay.replayed
        assert [{"id": i, "counter": 1} for i in ids] == [item.body for item in replay.items]
        assert all("amount" not in item.as_json()["body"] for item in replay.items)


def test_redacting_a_replay_only_removes_never_adds(
    database_url: str, victor: Actor, victor_now: Actor, disposing: Callable[[Charter], Charter]
) -> None:
    charter = disposing(build(database_url))
    doc = create_doc(charter, victor, "d")
    stored = charter.execute(victor_now, "doc.mark", target=doc, key="mark-2")
    assert "amount" not in stored.body
    assert "amount" not in charter.execute(victor, "doc.mark", target=doc, key="mark-2").body
    batch = charter.execute_many(victor_now, "doc.mark", [doc], key="batch-2")
    assert (
        "amount"
        not in charter.execute_many(victor, "doc.mark", [doc], key="batch-2")
        .items[0]
        .as_json()["body"]
    )
    assert "amount" not in batch.items[0].body


# -- B: every item counts against the rate limits, as its single call ---------------------


def test_an_invalid_item_over_the_rate_limit_is_rate_limited_and_writes_no_key(
    database_url: str, alice: Actor, disposing: Callable[[Charter], Charter]
) -> None:
    charter = disposing(build(database_url, rate_limits=limited(3)))
    bad = {"title": ""}
    under = charter.execute_many(alice, "doc.make", [bad, bad], key="under")  # 2 of 3
    assert ["invalid_input", "invalid_input"] == [i.error["code"] for i in under.items]
    assert 1 == keys_stored(charter)  # the batch's own key, under the limit
    over = charter.execute_many(alice, "doc.make", [bad] * 5, key="over")  # the 3rd, then over
    assert ["invalid_input"] + ["rate_limited"] * 4 == [i.error["code"] for i in over.items]
    before = keys_stored(charter)
    for n in range(3):  # over the limit: nothing passes its count, no key is written
        flood = charter.execute_many(alice, "doc.make", [bad] * 20, key=f"flood-{n}")
        assert {"rate_limited"} == {i.error["code"] for i in flood.items}
        assert not flood.replayed
    assert before == keys_stored(charter)


def test_an_invalid_item_of_an_all_or_nothing_batch_over_the_limit_is_rate_limited(
    database_url: str, alice: Actor, disposing: Callable[[Charter], Charter]
) -> None:
    charter = disposing(build(database_url, rate_limits=limited(2)))
    with pytest.raises(BatchFailed) as caught:
        charter.execute_many(alice, "doc.make_all", [{"title": ""}] * 4, key="aon")
    codes = [(f["position"], f["code"]) for f in caught.value.attrs["failures"]]
    expected = ["invalid_input"] * 2 + ["rate_limited"] * 2
    assert list(enumerate(expected)) == codes
    assert 0 == keys_stored(charter)


def test_a_replayed_batch_counts_one_call_per_item_and_is_refused_over_the_limit(
    database_url: str, alice: Actor, disposing: Callable[[Charter], Charter]
) -> None:
    charter = disposing(build(database_url, rate_limits=limited(5)))
    ids = [create_doc(charter, alice, f"d{i}") for i in range(2)]
    first = charter.execute_many(alice, "doc.mark", ids, key="b")  # 2 of 5
    assert 2 == first.applied
    assert charter.execute_many(alice, "doc.mark", ids, key="b").replayed  # 4 of 5
    # One call per item: item 0 is the 5th (its stored result), item 1 the 6th (over).
    partly = charter.execute_many(alice, "doc.mark", ids, key="b")
    assert not partly.replayed
    assert ["replayed", "refused"] == [i.status for i in partly.items]
    assert {"id": ids[0], "counter": 1} == partly.items[0].body
    assert "rate_limited" == partly.items[1].error["code"]
    over = charter.execute_many(alice, "doc.mark", ids, key="b")  # both over: no key read
    assert ["rate_limited"] * 2 == [i.error["code"] for i in over.items]
    assert not over.replayed
    with pytest.raises(RateLimited):  # as a single keyed retry is
        charter.execute(alice, "doc.mark", target=ids[0], key="b#0")
    assert [1, 1] == counters(charter, ids)


def counters(charter: Charter, ids: list[int]) -> list[int]:
    with charter.session() as session:
        return [session.get(Doc, i).counter for i in ids]


# -- C: a failed all-or-nothing batch audits no state it produced -------------------------


def test_a_failed_all_or_nothing_batch_audits_no_state_the_record_never_had(
    database_url: str, alice: Actor, disposing: Callable[[Charter], Charter]
) -> None:
    charter = disposing(build(database_url))
    doc = create_doc(charter, alice, "d")
    with pytest.raises(BatchFailed) as caught:  # the same id twice: the 2nd sees "approved"
        charter.execute_many(alice, "doc.approve_all", [doc, doc])
    assert [(1, "not_found")] == [
        (f["position"], f["code"]) for f in caught.value.attrs["failures"]
    ]
    with charter.session() as session:
        assert "draft" == session.get(Doc, doc).state
    with charter.engine.connect() as c:
        rows = c.execute(select(audit_table).where(audit_table.c.action == "doc.approve_all")).all()
    by_position = {r.detail["batch"]["position"]: r for r in rows}
    assert {0: "batch_failed", 1: "not_found"} == {p: r.outcome for p, r in by_position.items()}
    for row in rows:
        assert ("draft", "draft") == (row.state_before, row.state_after)
