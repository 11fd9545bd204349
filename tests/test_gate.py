"""The gate's pipeline: validation, tenant isolation, deny by default, atomicity."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select

from charter import (
    Actor,
    Charter,
    Forbidden,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    ReasonRequired,
)
from charter.audit import audit_table
from charter.errors import DomainError
from charter.gate import HandlerFailed

from .app import Doc


def create_doc(charter: Charter, actor: Actor, title: str = "hello") -> int:
    outcome = charter.execute(actor, "doc.create", {"title": title, "amount": "12.50"})
    assert outcome.resource_id is not None
    return int(outcome.resource_id)


def audit_rows(charter: Charter) -> list[dict]:
    with charter.session() as session:
        return [
            dict(r._mapping)
            for r in session.execute(select(audit_table).order_by(audit_table.c.id))
        ]


def load(charter: Charter, doc_id: int) -> Doc:
    with charter.session() as session:
        doc = session.get(Doc, doc_id)
        assert doc is not None
        return doc


def test_an_allowed_action_changes_the_record_and_writes_one_audit_entry(charter, alice):
    doc_id = create_doc(charter, alice)
    outcome = charter.execute(alice, "doc.rename", {"title": "renamed"}, target=doc_id)
    assert {"id": doc_id, "title": "renamed"} == outcome.body
    assert "renamed" == load(charter, doc_id).title
    rows = audit_rows(charter)
    assert ["doc.create", "doc.rename"] == [r["action"] for r in rows]
    assert ("allow", "ok", str(doc_id)) == (
        rows[1]["decision"],
        rows[1]["outcome"],
        rows[1]["resource_id"],
    )


def test_create_sets_the_tenant_and_reports_201(charter, alice):
    outcome = charter.execute(alice, "doc.create", {"title": "x"})
    assert 201 == outcome.status
    assert "acme" == load(charter, int(outcome.resource_id)).tenant_id


def test_create_in_another_tenant_is_forbidden(charter, alice):
    with pytest.raises(Forbidden):
        charter.execute(alice, "doc.create", {"title": "x", "tenant_id": "globex"})
    with charter.session() as session:
        assert [] == session.execute(select(Doc)).all()


def test_an_action_without_a_rule_is_denied_and_audited(charter, alice):
    doc_id = create_doc(charter, alice)
    with pytest.raises(Forbidden) as info:
        charter.execute(alice, "doc.nothing", target=doc_id)
    assert "no_rule" == info.value.decision.kind
    assert "hello" == load(charter, doc_id).title
    denied = audit_rows(charter)[-1]
    assert ("doc.nothing", "deny", "forbidden") == (
        denied["action"],
        denied["decision"],
        denied["outcome"],
    )


def test_a_denial_leaves_the_record_unchanged(charter, alice):
    doc_id = create_doc(charter, alice)
    with pytest.raises(Forbidden):
        charter.execute(alice, "doc.publish", target=doc_id)  # alice is no editor
    assert "draft" == load(charter, doc_id).state


def test_another_tenants_record_is_not_found_and_the_attempt_is_audited(charter, alice, eve):
    doc_id = create_doc(charter, alice)
    with pytest.raises(NotFound):
        charter.execute(eve, "doc.rename", {"title": "pwned"}, target=doc_id)
    assert "hello" == load(charter, doc_id).title
    attempt = audit_rows(charter)[-1]
    assert ("eve", "globex", "not_found", "deny") == (
        attempt["subject"],
        attempt["tenant"],
        attempt["outcome"],
        attempt["decision"],
    )


def test_a_missing_record_and_a_foreign_record_look_the_same(charter, alice, eve):
    doc_id = create_doc(charter, alice)
    with pytest.raises(NotFound) as foreign:
        charter.execute(eve, "doc.read", target=doc_id)
    with pytest.raises(NotFound) as missing:
        charter.execute(eve, "doc.read", target=doc_id + 1000)
    assert (missing.value.status, missing.value.code) == (foreign.value.status, foreign.value.code)


def test_unknown_input_fields_are_rejected_before_anything_runs(charter, alice):
    doc_id = create_doc(charter, alice)
    with pytest.raises(InvalidInput) as info:
        charter.execute(alice, "doc.rename", {"title": "x", "state": "published"}, target=doc_id)
    assert ["state"] == info.value.attrs["errors"][0]["loc"]
    assert "draft" == load(charter, doc_id).state
    assert 1 == len(audit_rows(charter))


def test_a_handler_crash_leaves_no_effect_and_no_audit_entry(charter, alice):
    doc_id = create_doc(charter, alice)
    with pytest.raises(HandlerFailed) as info:
        charter.execute(alice, "doc.explode", target=doc_id)
    assert "boom" not in info.value.message
    assert "hello" == load(charter, doc_id).title
    assert ["doc.create"] == [r["action"] for r in audit_rows(charter)]


def test_a_domain_error_rolls_back_the_effect_and_is_audited_as_an_outcome(charter, alice):
    doc_id = create_doc(charter, alice)
    with pytest.raises(DomainError) as info:
        charter.execute(alice, "doc.refuse", target=doc_id)
    assert "over_limit" == info.value.code
    assert "hello" == load(charter, doc_id).title
    last = audit_rows(charter)[-1]
    assert ("allow", "over_limit") == (last["decision"], last["outcome"])


def test_a_required_reason_is_enforced_before_anything_runs(charter, alice):
    doc_id = create_doc(charter, alice)
    with pytest.raises(ReasonRequired):
        charter.execute(alice, "doc.purge", target=doc_id, reason="   ")
    charter.execute(alice, "doc.purge", target=doc_id, reason="customer asked")
    assert "customer asked" == audit_rows(charter)[-1]["reason"]


def test_impersonation_requires_a_reason_and_audits_both_actors(charter, alice):
    doc_id = create_doc(charter, alice)
    support = Actor.make("sam", "acme", kind="support", roles={"support"}, scopes={"*"})
    acting = support.impersonate(alice)
    with pytest.raises(ReasonRequired):
        charter.execute(acting, "doc.rename", {"title": "fixed"}, target=doc_id)
    charter.execute(acting, "doc.rename", {"title": "fixed"}, target=doc_id, reason="ticket 42")
    last = audit_rows(charter)[-1]
    assert ("alice", "sam", "ticket 42") == (last["subject"], last["real_actor"], last["reason"])


def test_sensitive_reads_are_audited_and_change_nothing(charter, alice):
    doc_id = create_doc(charter, alice)
    outcome = charter.execute(alice, "doc.read", target=doc_id)
    assert Decimal("12.50") == Decimal(outcome.body["amount"])
    last = audit_rows(charter)[-1]
    assert ("doc.read", "ok") == (last["action"], last["outcome"])
    assert 1 == load(charter, doc_id).version


def test_state_before_and_after_are_recorded(charter, editor):
    doc_id = create_doc(charter, editor)
    charter.execute(editor, "doc.publish", target=doc_id)
    last = audit_rows(charter)[-1]
    assert ("draft", "published") == (last["state_before"], last["state_after"])


def test_each_change_bumps_the_version_and_if_match_is_enforced(charter, alice):
    doc_id = create_doc(charter, alice)
    outcome = charter.execute(
        alice, "doc.rename", {"title": "a"}, target=doc_id, expected_version=1
    )
    assert 2 == outcome.version
    with pytest.raises(PreconditionFailed):
        charter.execute(alice, "doc.rename", {"title": "b"}, target=doc_id, expected_version=1)
    assert "a" == load(charter, doc_id).title


def test_secret_inputs_never_reach_the_audit_trail(charter, alice):
    charter.execute(alice, "doc.create", {"title": "x", "api_token": "tok_live_SECRET"})
    row = audit_rows(charter)[-1]
    assert "tok_live_SECRET" not in repr(row)
    assert row["input_digest"]
    assert 64 == len(row["input_digest"])


def test_the_trail_of_a_fresh_database_verifies(charter, alice):
    doc_id = create_doc(charter, alice)
    charter.execute(alice, "doc.rename", {"title": "b"}, target=doc_id)
    report = charter.verify_audit()
    assert report.ok, report.problems
    assert 2 == report.entries


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_on_postgres_the_audit_rides_on_the_records_update(charter, alice):
    """One statement carries the change and its audit entry (and a keyed call's outcome)."""
    from sqlalchemy import event

    doc_id = create_doc(charter, alice)
    statements: list[str] = []

    def seen(conn, cursor, statement, *args):
        statements.append(" ".join(statement.split())[:40])

    event.listen(charter.engine, "before_cursor_execute", seen)
    try:
        charter.execute(alice, "doc.rename", {"title": "folded"}, target=doc_id)
        one = list(statements)
        statements.clear()
        charter.execute(alice, "doc.charge", {"amount": "2"}, target=doc_id, key="fold-1")
        keyed = list(statements)
    finally:
        event.remove(charter.engine, "before_cursor_execute", seen)
    assert 2 == len(one)
    assert one[1].startswith("WITH charter_entry AS (INSERT INTO")
    assert 2 == len(keyed)
    doc = load(charter, doc_id)
    assert ("folded", 1, 3) == (doc.title, doc.counter, doc.version)
    assert charter.verify_audit().ok
    assert ["doc.create", "doc.rename", "doc.charge"] == [r["action"] for r in audit_rows(charter)]


def test_a_handler_that_flushes_takes_the_ordinary_path_with_the_same_result(charter, alice):
    doc_id = create_doc(charter, alice)
    outcome = charter.execute(alice, "doc.two_steps", {"title": "both"}, target=doc_id)
    doc = load(charter, doc_id)
    assert ({"title": "both", "counter": 1}, "both", 1, 2) == (
        outcome.body,
        doc.title,
        doc.counter,
        doc.version,
    )
    assert charter.verify_audit().ok
