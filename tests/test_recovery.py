"""Recovery points: an outside charge happens once, whatever crashes and retries."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from charter import Actor, Charter
from charter.demo.payments import PaymentProviderStub, PaymentProviderUnavailable
from charter.idempotency import IdempotencyKeyInProgress, idempotency_table, lookup

from . import recovery_app
from .test_gate import create_doc, load

LATER = lambda: datetime.now(UTC) + timedelta(hours=1)  # noqa: E731 - a clock past every lease


@pytest.fixture
def provider() -> Iterator[PaymentProviderStub]:
    with PaymentProviderStub() as stub:
        yield stub


@pytest.fixture
def payer(database_url: str, provider: PaymentProviderStub) -> Iterator[Charter]:
    charter = recovery_app.build(database_url, provider.base_url)
    yield charter
    charter.engine.dispose()


def charges(provider: PaymentProviderStub) -> int:
    return provider.stats()["charges_created"]


def test_a_paid_action_charges_once_and_a_retry_replays(payer, provider, alice):
    doc_id = create_doc(payer, alice)
    first = payer.execute(alice, "doc.pay", {"amount": "10"}, target=doc_id, key="pay-1")
    again = payer.execute(alice, "doc.pay", {"amount": "10"}, target=doc_id, key="pay-1")
    assert (False, True, first.body) == (first.replayed, again.replayed, again.body)
    assert (1, "paid", 1) == (
        charges(provider),
        load(payer, doc_id).state,
        load(payer, doc_id).counter,
    )
    history = [h["outcome"] for h in payer.history("test_docs", doc_id)]
    assert ["ok", "step:charge", "ok", "ok"] == history  # create, recovery point, final, replay
    assert payer.verify_audit().ok


def test_a_provider_outage_leaves_a_resumable_request_and_the_retry_finishes(
    payer, provider, alice
):
    doc_id = create_doc(payer, alice)
    provider.inject_faults(fail_next=1)  # the provider charges, then the answer is lost (503)
    with pytest.raises(PaymentProviderUnavailable):
        payer.execute(alice, "doc.pay", {"amount": "10"}, target=doc_id, key="pay-2")
    assert "paying" == load(payer, doc_id).state
    outcome = payer.execute(alice, "doc.pay", {"amount": "10"}, target=doc_id, key="pay-2")
    assert (False, 1, "paid") == (outcome.replayed, charges(provider), load(payer, doc_id).state)


def _crash(url: str, provider_url: str, doc_id: int, point: str) -> None:
    charter = recovery_app.build(url, provider_url, crash=point)
    charter.execute(
        Actor.make("alice", "acme", roles={"member"}),
        "doc.pay",
        {"amount": "10"},
        target=doc_id,
        key="crash-pay",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "code", "charged"),
    [("before_charge", 21, 0), ("after_charge", 22, 1), ("after_step", 23, 1)],
)
def test_a_crash_at_any_phase_resumes_to_one_charge_and_one_effect(
    database_url, provider, alice, point, code, charged, disposing
):
    setup = disposing(recovery_app.build(database_url, provider.base_url))
    doc_id = create_doc(setup, alice)
    proc = multiprocessing.get_context("spawn").Process(
        target=_crash, args=(database_url, provider.base_url, doc_id, point)
    )
    proc.start()
    proc.join(60)
    assert (code, charged) == (proc.exitcode, charges(provider))
    assert "paying" == load(setup, doc_id).state  # phase 1 committed with its recovery point
    with pytest.raises(IdempotencyKeyInProgress):  # the dead worker's lease still runs
        setup.execute(alice, "doc.pay", {"amount": "10"}, target=doc_id, key="crash-pay")
    later = disposing(recovery_app.build(database_url, provider.base_url, clock=LATER))
    outcome = later.execute(alice, "doc.pay", {"amount": "10"}, target=doc_id, key="crash-pay")
    assert not outcome.replayed
    doc = load(later, doc_id)
    assert (1, "paid", 1, doc.title) == (
        charges(provider),
        doc.state,
        doc.counter,
        outcome.body["charge"],
    )
    assert later.execute(
        alice, "doc.pay", {"amount": "10"}, target=doc_id, key="crash-pay"
    ).replayed
    assert later.verify_audit().ok


@pytest.mark.slow
def test_the_background_completer_finishes_abandoned_requests(
    database_url, provider, alice, disposing
):
    setup = disposing(recovery_app.build(database_url, provider.base_url))
    doc_id = create_doc(setup, alice)
    proc = multiprocessing.get_context("spawn").Process(
        target=_crash, args=(database_url, provider.base_url, doc_id, "after_charge")
    )
    proc.start()
    proc.join(60)
    later = disposing(recovery_app.build(database_url, provider.base_url, clock=LATER))
    assert [("crash-pay", "completed")] == later.resume_abandoned()
    assert [] == later.resume_abandoned()
    assert (1, "paid") == (charges(provider), load(later, doc_id).state)
    with later.session() as s:
        claim = s.execute(select(idempotency_table)).one()
        row = lookup(s, claim.tenant, claim.subject, claim.key)
    assert (True, None, None) == (row.completed_at is not None, row.request_input, row.locked_until)


def test_a_resumed_request_keeps_both_identities_and_the_impersonation_session():
    from charter.idempotency.recovery import actor_from_snapshot, actor_snapshot

    sam = Actor.make("sam", "acme", kind="support", roles={"support"}, scopes={"invoices:write"})
    alice = Actor.make("alice", "acme", roles={"member"})
    acting = sam.impersonate(alice, session="s1")
    resumed = actor_from_snapshot(json.loads(json.dumps(actor_snapshot(acting))))
    assert ("sam", "alice", "s1") == (resumed.id, resumed.on_behalf_of.id, resumed.session)
    assert resumed.scopes == acting.scopes
    assert actor_from_snapshot(actor_snapshot(alice)).session is None


# -- who may resume, the write lock, refusals and lost leases (regressions) -----------------

import sqlite3  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from charter import CharterError  # noqa: E402
from charter.idempotency import ReplayedError  # noqa: E402

from . import app as test_app  # noqa: E402
from .conftest import AUDIT_KEYS  # noqa: E402
from .test_gate import audit_rows  # noqa: E402


def _claim(charter: Charter, key: str):
    with charter.session() as s:
        return lookup(s, "acme", "erin" if key.startswith("erin") else "alice", key)


def test_an_impersonator_without_a_grant_cannot_take_the_subjects_request_over(
    payer, provider, database_url, disposing
):
    erin = Actor.make("erin", "acme", roles={"editor"})  # the grant covers members only
    sam = Actor.make("sam", "acme", kind="support", roles={"support"})
    doc_id = create_doc(payer, erin)
    provider.inject_faults(fail_next=1)  # charged, the answer lost: abandoned, no lease held
    with pytest.raises(PaymentProviderUnavailable):
        payer.execute(erin, "doc.pay", {"amount": "10"}, target=doc_id, key="erin-pay")
    before = _claim(payer, "erin-pay")
    for worker in (payer, disposing(recovery_app.build(database_url, provider.base_url))):
        with pytest.raises(CharterError) as refused:  # as a new call of sam's is refused
            worker.execute(sam.impersonate(erin), "doc.pay", {"amount": "10"}, target=doc_id,
                           key="erin-pay", reason="help")  # fmt: skip
        assert (404, "not_found") == (refused.value.status, refused.value.code)
    after = _claim(payer, "erin-pay")
    assert (before.phase, None, None) == (after.phase, after.locked_until, after.completed_at)
    assert "paying" == load(payer, doc_id).state
    denied = [r for r in audit_rows(payer) if r["real_actor"] == "sam"]
    assert [("deny", "impersonation-grant")] * 2 == [(r["decision"], r["rule"]) for r in denied]
    outcome = payer.execute(erin, "doc.pay", {"amount": "10"}, target=doc_id, key="erin-pay")
    assert (False, 1, "paid") == (outcome.replayed, charges(provider), load(payer, doc_id).state)


def _pay_during(charter: Charter, during: Callable[[Any], Any]) -> None:
    """``doc.pay_during``: an outside step that runs ``during(ctx)`` as its call."""
    from .app import Doc

    @charter.action("doc.pay_during", on=Doc, allow=True, idempotency="required")
    def pay(ctx, doc, data) -> dict[str, Any]:
        doc.state = "paying"
        charge = ctx.external("charge", lambda key: during(ctx) or f"ch-{key[-6:]}")
        doc.state, doc.counter = "paid", doc.counter + 1
        return {"charge": charge, "counter": doc.counter}


def test_no_transaction_is_open_while_the_outside_call_runs(database_url, alice, disposing):
    """On SQLite an open BEGIN IMMEDIATE would hold every other writer for the call's length."""
    seen: dict[str, Any] = {}

    def during(ctx) -> None:
        seen["open"] = ctx.session.in_transaction()
        if database_url.startswith("sqlite"):
            other = sqlite3.connect(database_url.split("///", 1)[1], timeout=0)
            try:
                other.execute("BEGIN IMMEDIATE")  # another writer: at once, not "locked"
                other.rollback()
                seen["other writer"] = "went through"
            except sqlite3.OperationalError as exc:
                seen["other writer"] = str(exc)
            finally:
                other.close()

    charter = disposing(test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS)))
    _pay_during(charter, during)
    doc_id = create_doc(charter, alice)
    outcome = charter.execute(alice, "doc.pay_during", {}, target=doc_id, key="p1")
    assert (1, False) == (outcome.body["counter"], seen["open"])
    if database_url.startswith("sqlite"):
        assert "went through" == seen["other writer"]


def test_a_refusal_after_a_recovery_point_is_stored_and_its_claim_released(payer, provider,
                                                                           alice):  # fmt: skip
    doc_id = create_doc(payer, alice)
    with pytest.raises(CharterError) as first:
        payer.execute(alice, "doc.pay_refused", {"amount": "10"}, target=doc_id, key="r1")
    assert (409, "over_limit") == (first.value.status, first.value.code)
    for _ in range(2):  # at once, not "in progress", and never run again
        with pytest.raises(ReplayedError) as again:
            payer.execute(alice, "doc.pay_refused", {"amount": "10"}, target=doc_id, key="r1")
        assert ("over_limit", first.value.message) == (again.value.code, again.value.message)
    claim = _claim(payer, "r1")
    assert (True, None, None) == (claim.completed_at is not None, claim.locked_until,
                                  claim.request_input)  # fmt: skip
    outcomes = [r["outcome"] for r in audit_rows(payer) if r["idempotency_key"] == "r1"]
    replayed = [r["replayed"] for r in audit_rows(payer) if r["idempotency_key"] == "r1"]
    assert ["step:charge", "over_limit", "over_limit", "over_limit"] == outcomes
    assert [False, False, True, True] == [bool(r) for r in replayed]
    assert (1, "paying") == (charges(provider), load(payer, doc_id).state)


def test_a_worker_whose_request_was_taken_over_saves_nothing_more(database_url, alice, disposing):
    """A slow worker (its lease ran out during the outside call) finds another finished it:
    it answers 409, and neither its input nor a lease comes back onto the finished claim."""
    slow = disposing(test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS,
                                            recovery_lease=timedelta(seconds=1))))  # fmt: skip
    later = disposing(test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS,
                                             clock=LATER)))  # fmt: skip
    doc_id = create_doc(slow, alice)
    taken: dict[str, Any] = {}

    def take_over(ctx) -> None:  # while the slow worker is in its outside call
        if not taken:
            taken["outcome"] = later.execute(alice, "doc.pay_during", {}, target=doc_id, key="k")

    _pay_during(slow, take_over)
    _pay_during(later, lambda ctx: None)
    with pytest.raises(IdempotencyKeyInProgress) as lost:
        slow.execute(alice, "doc.pay_during", {}, target=doc_id, key="k")
    assert 409 == lost.value.status
    claim = _claim(slow, "k")
    assert (True, None, None) == (claim.completed_at is not None, claim.locked_until,
                                  claim.request_input)  # fmt: skip
    doc = load(slow, doc_id)
    assert ("paid", 1) == (doc.state, doc.counter)
    replay = slow.execute(alice, "doc.pay_during", {}, target=doc_id, key="k")
    assert (True, taken["outcome"].body) == (replay.replayed, replay.body)
