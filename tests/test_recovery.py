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
