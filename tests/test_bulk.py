"""Bulk actions: every item through its action's whole pipeline, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import select

from charter import (
    Actor,
    BatchEmpty,
    BatchFailed,
    BatchTooLarge,
    BulkUnsupported,
    Charter,
    ConfigurationError,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
)
from charter.audit import audit_table
from charter.credits import Credits
from charter.data.bulk import DEFAULT_MAX_BATCH

from . import bulk_app
from .app import Doc, is_member
from .test_gate import create_doc

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gate(database_url: str) -> Iterator[Charter]:
    charter = bulk_app.build(database_url)
    yield charter
    charter.engine.dispose()


def counters(charter: Charter, ids: list[int]) -> list[int]:
    with charter.session() as session:
        found = {d.id: d.counter for d in session.scalars(select(Doc).where(Doc.id.in_(ids)))}
    return [found[i] for i in ids]


def entries(charter: Charter, action: str) -> list[Any]:
    with charter.engine.connect() as c:
        return c.execute(
            select(audit_table).where(audit_table.c.action == action).order_by(audit_table.c.id)
        ).all()


def docs(charter: Charter, actor: Actor, n: int, title: str = "doc") -> list[int]:
    return [create_doc(charter, actor, f"{title}-{i}") for i in range(n)]


# -- per item ----------------------------------------------------------------------------


def test_a_foreign_or_unknown_id_in_a_batch_is_refused_exactly_like_a_missing_one(
    gate: Charter, alice: Actor, eve: Actor
) -> None:
    own = docs(gate, alice, 2)
    foreign = create_doc(gate, eve, "eve's")
    missing = foreign + 1000
    batch = gate.execute_many(alice, "doc.tick", [own[0], foreign, missing, own[1]])

    assert ["applied", "refused", "refused", "applied"] == [i.status for i in batch.items]
    assert [1, 1] == counters(gate, own)
    assert [0] == counters(gate, [foreign])
    foreign_error, missing_error = batch.items[1].error, batch.items[2].error
    assert foreign_error is not None
    assert missing_error is not None
    # The same code, status, shape and message; only the id asked for differs.
    assert {
        "code": "not_found",
        "status": 404,
        "message": f"test_docs {foreign} was not found",
    } == (dict(foreign_error))
    assert dict(missing_error) == {
        **dict(foreign_error),
        "message": f"test_docs {missing} was not found",
    }
    assert batch.items[1].http_status == batch.items[2].http_status == 404
    # Audited as the single calls are: the refusal as not found, with its batch position.
    refused = [e for e in entries(gate, "doc.tick") if e.outcome == "not_found"]
    assert [1, 2] == [e.detail["batch"]["position"] for e in refused]
    assert {"not-found"} == {e.rule for e in refused}


def test_per_item_mode_applies_what_it_can_and_states_the_partial_success(
    gate: Charter, alice: Actor
) -> None:
    own = docs(gate, alice, 2)
    batch = gate.execute_many(alice, "doc.tick", [own[0], {"target": own[1]}, {"id": 1}, True])

    assert (2, 2, True) == (batch.applied, batch.refused, batch.partial)
    body = batch.as_json()
    assert {"size": 4, "applied": 2, "refused": 2, "replayed": 0, "partial": True} == {
        k: body[k] for k in ("size", "applied", "refused", "replayed", "partial")
    }
    assert ["invalid_input", "invalid_input"] == [i["error"]["code"] for i in body["items"][2:]]
    assert {"id": own[1], "counter": 1} == body["items"][1]["body"]
    assert [0, 1, 2, 3] == [i["position"] for i in body["items"]]


def test_every_applied_item_is_audited_as_its_single_call_with_the_batch_key_and_position(
    gate: Charter, alice: Actor
) -> None:
    own = docs(gate, alice, 3)
    gate.execute_many(alice, "doc.tick", own, key="batch-1", reason="monthly run")

    rows = entries(gate, "doc.tick")
    assert ["ok"] * 3 == [r.outcome for r in rows]
    assert [str(i) for i in own] == [r.resource_id for r in rows]
    assert ["batch-1#0", "batch-1#1", "batch-1#2"] == [r.idempotency_key for r in rows]
    assert {"monthly run"} == {r.reason for r in rows}
    assert [{"key": "batch-1", "position": p, "size": 3, "mode": "per_item"} for p in range(3)] == [
        r.detail["batch"] for r in rows
    ]
    assert gate.verify_audit().ok


# -- batch idempotency -------------------------------------------------------------------


@pytest.mark.parametrize("action", ["doc.tick", "doc.tick_all"])
def test_a_replayed_batch_returns_the_whole_stored_result_and_runs_nothing(
    gate: Charter, alice: Actor, eve: Actor, action: str
) -> None:
    own = docs(gate, alice, 3)
    items = own if action == "doc.tick_all" else [*own, create_doc(gate, eve)]
    first = gate.execute_many(alice, action, items, key="k-replay")
    again = gate.execute_many(alice, action, items, key="k-replay")

    assert (False, True) == (first.replayed, again.replayed)
    assert first.as_json() == again.as_json()
    assert [1, 1, 1] == counters(gate, own)


@pytest.mark.parametrize("action", ["doc.tick", "doc.tick_all"])
def test_the_same_batch_key_with_other_items_or_another_order_is_refused_with_422(
    gate: Charter, alice: Actor, action: str
) -> None:
    own = docs(gate, alice, 3)
    gate.execute_many(alice, action, own[:2], key="k-1")
    for other in (own, own[1::-1], [own[0], own[2]]):
        with pytest.raises(IdempotencyKeyReused) as caught:
            gate.execute_many(alice, action, other, key="k-1")
        assert 422 == caught.value.status
    assert [1, 1, 0] == counters(gate, own)


def test_a_batch_key_is_bounded_so_that_every_derived_key_fits(gate: Charter, alice: Actor) -> None:
    own = docs(gate, alice, 1)
    with pytest.raises(IdempotencyKeyInvalid):
        gate.execute_many(alice, "doc.tick", own, key="k" * 248)
    with pytest.raises(IdempotencyKeyMissing):
        gate.execute_many(alice, "doc.tick_keyed", own)
    assert 1 == gate.execute_many(alice, "doc.tick", own, key="k" * 247).applied


def test_an_items_derived_key_is_out_of_a_clients_reach(gate: Charter, alice: Actor) -> None:
    own = docs(gate, alice, 2)
    gate.execute_many(alice, "doc.tick", own, key="b")
    for target in own:  # neither its replay nor another request under it: 400, nothing run
        with pytest.raises(IdempotencyKeyInvalid):
            gate.execute(alice, "doc.tick", target=target, key="b#1")
    assert [1, 1] == counters(gate, own)


# -- bounds ------------------------------------------------------------------------------


def test_a_batch_over_the_maximum_is_refused_whole_and_an_empty_one_too(
    gate: Charter, alice: Actor
) -> None:
    own = docs(gate, alice, 4)
    with pytest.raises(BatchTooLarge) as caught:
        gate.execute_many(alice, "doc.tick_small", own)
    assert (413, "batch_too_large", 3, 4) == (
        caught.value.status, caught.value.code, caught.value.attrs["max"],
        caught.value.attrs["size"],
    )  # fmt: skip
    with pytest.raises(BatchEmpty) as empty:
        gate.execute_many(alice, "doc.tick", [])
    assert 400 == empty.value.status
    assert [0, 0, 0, 0] == counters(gate, own)
    assert 3 == gate.execute_many(alice, "doc.tick_small", own[:3]).applied


def test_the_charter_bounds_every_bulk_action_1000_items_by_default(
    database_url: str, alice: Actor, disposing: Any
) -> None:
    assert 1000 == DEFAULT_MAX_BATCH
    charter = disposing(bulk_app.build(database_url, max_batch=2))
    own = docs(charter, alice, 3)
    with pytest.raises(BatchTooLarge):
        charter.execute_many(alice, "doc.tick_all", own)
    with pytest.raises(BatchTooLarge):  # per item: nothing applied either
        charter.execute_many(alice, "doc.tick", own)
    assert [0, 0, 0] == counters(charter, own)
    with pytest.raises(BatchTooLarge):
        bulk_app.build(database_url).execute_many(alice, "doc.tick", [1] * 1001)


def test_only_an_action_declared_for_bulk_takes_a_batch(gate: Charter, alice: Actor) -> None:
    own = docs(gate, alice, 1)
    with pytest.raises(BulkUnsupported):
        gate.execute_many(alice, "doc.bump", own)
    assert [0] == counters(gate, own)


def test_bulk_declarations_are_checked_at_start_up() -> None:
    charter = Charter(database_url="sqlite://", development=True)
    charter.resource(Doc, tenant="tenant_id", state="state", version="version")

    def handler(ctx: Any, doc: Doc, data: BaseModel) -> None:
        return None

    for options in (
        {"bulk": "sometimes"},
        {"bulk": "per_item", "max_batch": 0},
        {"bulk": "per_item", "max_batch": 100_001},
        {"bulk": "per_item", "max_batch": True},
        {"max_batch": 10},
        {"bulk": "per_item", "sensitive_read": True},
    ):
        with pytest.raises(ConfigurationError):
            charter.action("doc.x", on=Doc, allow=is_member, **options)(handler)
    with pytest.raises(ConfigurationError):
        Charter(database_url="sqlite://", development=True, max_batch=0)


# -- all or nothing ----------------------------------------------------------------------


def test_an_all_or_nothing_batch_lists_every_failing_item_and_applies_nothing(
    gate: Charter, alice: Actor, eve: Actor
) -> None:
    own = docs(gate, alice, 3)
    foreign = create_doc(gate, eve)
    items = [own[0], foreign, own[1], {"target": own[2], "input": {"x": 1}}, foreign + 99]
    with pytest.raises(BatchFailed) as caught:
        gate.execute_many(alice, "doc.tick_all", items, key="aon-1")

    error = caught.value
    assert (422, "batch_failed", 5) == (error.status, error.code, error.attrs["size"])
    assert [(1, "not_found"), (3, "invalid_input"), (4, "not_found")] == [
        (f["position"], f["code"]) for f in error.attrs["failures"]
    ]
    assert error.attrs["failures"][0]["message"] == f"test_docs {foreign} was not found"
    assert [0, 0, 0, 0] == counters(gate, [*own, foreign])
    # Audited: the refusals as their single calls', the others as not applied.
    rows = entries(gate, "doc.tick_all")
    assert [("batch_failed", 0), ("batch_failed", 2), ("not_found", 1), ("not_found", 4)] == (
        sorted((r.outcome, r.detail["batch"]["position"]) for r in rows)
    )
    assert all(r.state_after == r.state_before for r in rows)
    # Nothing was stored under the key: the corrected batch runs.
    assert 2 == gate.execute_many(alice, "doc.tick_all", own[:2], key="aon-1").applied
    assert [1, 1, 0] == counters(gate, own)


def test_an_all_or_nothing_batch_applies_every_item_in_one_transaction(
    gate: Charter, alice: Actor
) -> None:
    own = docs(gate, alice, 3)
    batch = gate.execute_many(alice, "doc.tick_all", [own[2], own[0], own[1]], key="a")
    assert (3, False) == (batch.applied, batch.partial)
    assert [own[2], own[0], own[1]] == [i.body["id"] for i in batch.items]
    assert [1, 1, 1] == counters(gate, own)
    rows = entries(gate, "doc.tick_all")
    assert [0, 1, 2] == [r.detail["batch"]["position"] for r in rows]
    assert {"a"} == {r.idempotency_key for r in rows}
    assert gate.verify_audit().ok


def test_the_same_record_twice_in_an_all_or_nothing_batch_runs_twice_on_its_locked_state(
    gate: Charter, alice: Actor
) -> None:
    (doc,) = docs(gate, alice, 1)
    batch = gate.execute_many(alice, "doc.tick_all", [doc, doc])
    assert [1, 2] == [i.body["counter"] for i in batch.items]
    assert [2] == counters(gate, [doc])


# -- charges -----------------------------------------------------------------------------


def test_each_item_uses_the_quota_as_its_single_call_would(gate: Charter, alice: Actor) -> None:
    own = docs(gate, alice, 5)
    batch = gate.execute_many(alice, "doc.tick_quota", own)
    assert ["applied"] * 3 + ["refused"] * 2 == [i.status for i in batch.items]
    assert {"quota_exceeded"} == {i.error["code"] for i in batch.items if i.error}
    assert [1, 1, 1, 0, 0] == counters(gate, own)


def test_each_item_is_charged_and_an_item_beyond_the_balance_is_refused(
    gate: Charter, alice: Actor
) -> None:
    credits = Credits.of(gate)
    credits.open("acme")
    credits.grant("acme", 5)
    own = docs(gate, alice, 3)
    batch = gate.execute_many(alice, "doc.tick_paid", own)
    assert ["applied", "applied", "refused"] == [i.status for i in batch.items]
    assert "insufficient_credits" == batch.items[2].error["code"]
    assert 1 == credits.balance("acme")
    # All or nothing: the charges of the items that fitted roll back with the batch.
    credits.grant("acme", 2)
    more = docs(gate, alice, 2)
    with pytest.raises(BatchFailed) as caught:
        gate.execute_many(alice, "doc.tick_paid_all", more)
    assert [(1, "insufficient_credits")] == [
        (f["position"], f["code"]) for f in caught.value.attrs["failures"]
    ]
    assert 3 == credits.balance("acme")
    assert [0, 0] == counters(gate, more)


def test_each_item_counts_against_the_rate_limit(database_url: str, alice: Actor, disposing: Any):
    charter = disposing(bulk_app.build(database_url, rate_limits="memory://"))
    own = docs(charter, alice, 1)  # one write
    batch = charter.execute_many(alice, "doc.tick", own * 300)  # the write class: 300 a minute
    assert [299, 1] == [batch.applied, batch.refused]
    assert "rate_limited" == batch.items[-1].error["code"]
    assert [299] == counters(charter, own)


# -- PostgreSQL: crashes and concurrency -------------------------------------------------


@pytest.mark.postgres
def test_a_batch_killed_mid_way_and_sent_again_applies_each_item_at_most_once(
    pg_schema: str, tmp_path: Path, alice: Actor, disposing: Any
) -> None:
    from .conftest import _truncate_pg

    _truncate_pg(pg_schema)
    charter = disposing(bulk_app.build(pg_schema))
    own = docs(charter, alice, 12)
    hang = create_doc(charter, alice, "hang")
    ids = [*own[:7], hang, *own[7:]]
    marker = tmp_path / "hanging"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.bulk_app", pg_schema, "crash-1", str(marker),
         *map(str, ids)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the child ended before it reached the hanging item"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)  # mid-batch: item 7's transaction is open
        assert -signal.SIGKILL == child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert [1] * 7 + [0] * 5 == counters(charter, own)
    assert [0] == counters(charter, [hang])

    retry = charter.execute_many(alice, "doc.tick", ids, key="crash-1")
    assert ["replayed"] * 7 + ["applied"] * 6 == [i.status for i in retry.items]
    assert [1] * 12 == counters(charter, own)
    assert [1] == counters(charter, [hang])
    again = charter.execute_many(alice, "doc.tick", ids, key="crash-1")
    assert again.replayed
    assert again.as_json() == retry.as_json()
    assert [1] * 12 == counters(charter, own)
    ok = [r for r in entries(charter, "doc.tick") if r.outcome == "ok" and not r.replayed]
    assert sorted(map(str, ids)) == sorted(r.resource_id for r in ok)  # each applied once


@pytest.mark.postgres
def test_overlapping_all_or_nothing_batches_in_opposite_orders_never_deadlock(
    pg_schema: str, alice: Actor, disposing: Any
) -> None:
    from .conftest import _truncate_pg

    _truncate_pg(pg_schema)
    charter = disposing(bulk_app.build(pg_schema, conflict_retries=0))
    own = docs(charter, alice, 40)
    rounds, errors = 5, []
    barrier = threading.Barrier(2)

    def worker(order: list[int]) -> None:
        for _ in range(rounds):
            barrier.wait()
            try:
                charter.execute_many(alice, "doc.tick_all", order)
            except Exception as exc:  # a deadlock would surface here as 409
                errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(own,)),
        threading.Thread(target=worker, args=(own[::-1],)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [] == errors
    assert [2 * rounds] * 40 == counters(charter, own)


# -- derived item keys (regressions) ----------------------------------------------------------

from charter.actions import MAX_BATCH_LIMIT  # noqa: E402
from charter.data.batch import MAX_BATCH_KEY  # noqa: E402
from charter.idempotency.keys import MAX_KEY_LENGTH, item_key  # noqa: E402


def test_every_derived_item_key_fits_the_key_column() -> None:
    longest = item_key("k" * MAX_BATCH_KEY, MAX_BATCH_LIMIT - 1)
    assert len(longest) <= MAX_KEY_LENGTH


def test_a_client_key_cannot_take_a_batch_items_key_before_the_batch(
    gate: Charter, alice: Actor
) -> None:
    own = docs(gate, alice, 2)
    with pytest.raises(IdempotencyKeyInvalid):
        gate.execute(alice, "doc.tick", target=own[0], key="run-7#0")
    batch = gate.execute_many(alice, "doc.tick", own, key="run-7")
    assert (2, ["applied", "applied"]) == (batch.applied, [i.status for i in batch.items])
    assert [1, 1] == counters(gate, own)


def test_a_batch_key_holding_the_item_separator_is_refused(gate: Charter, alice: Actor) -> None:
    own = docs(gate, alice, 2)
    with pytest.raises(IdempotencyKeyInvalid) as refused:
        gate.execute_many(alice, "doc.tick", own, key="run#8")
    assert "'#'" in refused.value.message
    assert [0, 0] == counters(gate, own)


@pytest.mark.parametrize("action", ["doc.tick", "doc.tick_all"])
def test_a_credential_that_could_not_run_the_batch_gets_no_replay_of_it(
    gate: Charter, alice: Actor, action: str
) -> None:
    """A token of the same user without the action's scope got the stored result of alice's
    batch under her key: it now runs as a new batch would, each item refused, nothing told."""
    own = docs(gate, alice, 2)
    first = gate.execute_many(alice, action, own, key="k-cred")
    read_only = Actor.make("alice", "acme", roles={"member"}, scopes={"test_docs:read"})
    if action == "doc.tick":
        again = gate.execute_many(read_only, action, own, key="k-cred")
        assert not again.replayed
        assert {"forbidden"} == {item.error["code"] for item in again.items if item.error}
        assert {"refused"} == {item.status for item in again.items}
    else:
        with pytest.raises(BatchFailed) as caught:
            gate.execute_many(read_only, action, own, key="k-cred")
        assert "replayed" not in str(caught.value.headers).lower()
    assert not first.replayed
    assert [1, 1] == counters(gate, own)
