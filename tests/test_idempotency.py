"""Idempotency keys: exactly once, with replays, under concurrency and crashes."""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, event, func, select, text

from charter import Actor, Charter, CharterError, Forbidden, InvalidInput
from charter.audit import audit_table
from charter.idempotency import (
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    idempotency_table,
    lookup,
)
from charter.testing import FrozenClock

from . import app as test_app
from .conftest import AUDIT_KEYS
from .test_gate import audit_rows, create_doc, load


def idem_rows(charter: Charter) -> list[dict]:
    """Each stored key with its outcome (if completed)."""
    with charter.session() as s:
        keys = s.execute(
            select(idempotency_table.c.tenant, idempotency_table.c.subject, idempotency_table.c.key)
        ).all()
        return [dict(lookup(s, *k)._mapping) for k in keys]


def test_a_required_key_that_is_missing_is_a_400_and_nothing_runs(charter, alice):
    doc_id = create_doc(charter, alice)
    with pytest.raises(IdempotencyKeyMissing) as info:
        charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id)
    assert 400 == info.value.status
    assert 0 == load(charter, doc_id).counter


@pytest.mark.parametrize("key", ["", "x" * 256, "café", "a\nb", "tab\there", "del\x7f", "nul\x00"])
def test_malformed_keys_are_refused_and_nothing_is_stored(charter, alice, key):
    doc_id = create_doc(charter, alice)
    with pytest.raises(IdempotencyKeyInvalid):
        charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key=key)
    assert [] == idem_rows(charter)


def test_keys_of_255_printable_characters_are_accepted(charter, alice):
    doc_id = create_doc(charter, alice)
    charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="~" * 255)
    assert 1 == load(charter, doc_id).counter


def test_a_retry_with_the_same_key_replays_without_running_again(charter, alice):
    doc_id = create_doc(charter, alice)
    first = charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="k-1")
    again = charter.execute(alice, "doc.charge", {"amount": "5.00"}, target=doc_id, key="k-1")
    assert (first.body, first.status, False, True) == (
        again.body,
        again.status,
        first.replayed,
        again.replayed,
    )
    assert (1, Decimal("17.50")) == (load(charter, doc_id).counter, load(charter, doc_id).amount)
    with charter.session() as s:
        replays = s.execute(
            select(audit_table.c.replayed, audit_table.c.outcome)
            .where(audit_table.c.action == "doc.charge")
            .order_by(audit_table.c.id)
        ).all()
    assert [(False, "ok"), (True, "ok")] == [tuple(r) for r in replays]


def test_the_stored_outcome_says_what_the_calls_audit_entry_says(charter, alice):
    """On PostgreSQL the outcome shares the entry's parameters; on SQLite it is written apart."""
    doc_id = create_doc(charter, alice)
    outcome = charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="pay-1")
    [stored] = idem_rows(charter)
    [entry] = [r for r in audit_rows(charter) if r["idempotency_key"] == "pay-1"]
    assert ("acme", "alice", "pay-1") == (stored["tenant"], stored["subject"], stored["key"])
    assert (entry["resource_id"], entry["outcome"]) == (stored["resource_id"], stored["outcome"])
    assert (str(doc_id), "ok") == (stored["resource_id"], stored["outcome"])
    assert _utc(entry["at"]) == _utc(stored["completed_at"])
    assert (outcome.status, outcome.body) == (stored["response_status"], stored["response_body"])


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def test_the_same_key_with_other_input_is_refused_and_the_record_kept(charter, alice):
    doc_id = create_doc(charter, alice)
    charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="k-1")
    before = idem_rows(charter)
    with pytest.raises(IdempotencyKeyReused) as info:
        charter.execute(alice, "doc.charge", {"amount": "6"}, target=doc_id, key="k-1")
    assert 422 == info.value.status
    assert before == idem_rows(charter)
    assert 1 == load(charter, doc_id).counter


def test_the_same_key_on_another_target_or_action_is_refused(charter, alice):
    one, two = create_doc(charter, alice), create_doc(charter, alice)
    charter.execute(alice, "doc.charge", {"amount": "5"}, target=one, key="k-1")
    with pytest.raises(IdempotencyKeyReused):
        charter.execute(alice, "doc.charge", {"amount": "5"}, target=two, key="k-1")
    with pytest.raises(IdempotencyKeyReused):
        charter.execute(alice, "doc.limited", {"amount": "5"}, target=one, key="k-1")


def test_keys_are_scoped_to_the_subject_so_another_user_runs_independently(charter, alice):
    doc_id = create_doc(charter, alice)
    bob = Actor.make("bob", "acme", roles={"member"})
    charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="shared")
    outcome = charter.execute(bob, "doc.charge", {"amount": "7"}, target=doc_id, key="shared")
    assert (False, 2) == (outcome.replayed, load(charter, doc_id).counter)


def test_a_new_token_for_the_same_user_keeps_the_scope(charter, alice):
    doc_id = create_doc(charter, alice)
    charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="k")
    rotated = Actor.make("alice", "acme", roles={"member"}, scopes={"test_docs:write"})
    assert charter.execute(rotated, "doc.charge", {"amount": "5"}, target=doc_id, key="k").replayed


def test_a_domain_error_is_stored_and_replayed(charter, alice):
    doc_id = create_doc(charter, alice)
    with pytest.raises(CharterError) as first:
        charter.execute(alice, "doc.limited", {"amount": "500"}, target=doc_id, key="big")
    with pytest.raises(CharterError) as again:
        charter.execute(alice, "doc.limited", {"amount": "500"}, target=doc_id, key="big")
    assert ("over_limit", 409) == (first.value.code, first.value.status)
    assert (first.value.code, first.value.message) == (again.value.code, again.value.message)
    assert "true" == again.value.headers["Idempotent-Replayed"]
    assert 0 == load(charter, doc_id).counter


def test_a_domain_error_after_writes_rolls_the_effect_back_and_is_still_stored(charter, alice):
    doc_id = create_doc(charter, alice)
    for _ in range(2):
        with pytest.raises(CharterError) as info:
            charter.execute(alice, "doc.limited_late", {"amount": "1"}, target=doc_id, key="late")
        assert "over_limit" == info.value.code
    assert 0 == load(charter, doc_id).counter
    assert ["over_limit"] == [r["outcome"] for r in idem_rows(charter)]


_SCRATCH = Table("test_scratch_writes", MetaData(), Column("id", Integer, primary_key=True))


@pytest.mark.parametrize("how", ["core", "text", "text_returning", "credits"])
def test_a_keyed_domain_error_after_writes_outside_the_orm_rolls_them_back(charter, alice, how):
    """Core on the session's connection, text(), the credits ledger: none is an ORM write, and
    each used to be committed with the stored refusal (the refusal was stored in the call's own
    transaction when the ORM had written nothing). Now anything that reached the database
    rolls back, as without a key, and the refusal is still stored and replayed."""
    from charter import DomainError
    from charter.credits import Credits

    _SCRATCH.drop(charter.engine, checkfirst=True)
    _SCRATCH.create(charter.engine)
    credits = Credits.of(charter)
    credits.open("acme")
    credits.grant("acme", 10)

    class Refused(DomainError):
        code = "refused_late"

    @charter.action("doc.write_then_refuse", allow=True, idempotency="required")
    def write_then_refuse(ctx, _record, _data):
        connection = ctx.session.connection()
        if how == "core":
            connection.execute(_SCRATCH.insert().values(id=1))
        elif how == "text":
            connection.execute(text("INSERT INTO test_scratch_writes (id) VALUES (1)"))
        elif how == "text_returning":  # a TextualSelect: is_select, yet it writes
            returning = text("INSERT INTO test_scratch_writes (id) VALUES (1) RETURNING id")
            connection.execute(returning.columns(_SCRATCH.c.id))
        else:
            credits.capture(ctx, credits.hold(ctx, 4, expires_in=timedelta(minutes=5)))
        raise Refused("refused after writing")

    for _ in range(2):  # the first execution, then its replay
        with pytest.raises(Refused if _ == 0 else CharterError) as info:
            charter.execute(alice, "doc.write_then_refuse", key="w1")
        assert "refused_late" == info.value.code
    with charter.engine.connect() as connection:
        assert 0 == connection.scalar(select(func.count()).select_from(_SCRATCH))
    assert (10, 0) == (credits.balance("acme"), credits.balance("acme", "credits@spent"))
    assert ["refused_late"] == [r["outcome"] for r in idem_rows(charter)]
    assert credits.verify().ok


def test_denials_are_not_stored_so_a_later_retry_runs(charter, alice, editor):
    doc_id = create_doc(charter, alice)
    member_only = Actor.make("ed", "acme", roles={"member"})
    with pytest.raises(Forbidden):
        charter.execute(member_only, "doc.publish_once", target=doc_id, key="pub")
    assert [] == idem_rows(charter)
    assert not charter.execute(editor, "doc.publish_once", target=doc_id, key="pub").replayed


def test_validation_errors_are_not_stored(charter, alice):
    doc_id = create_doc(charter, alice)
    with pytest.raises(InvalidInput):
        charter.execute(alice, "doc.charge", {"amount": "-1"}, target=doc_id, key="k")
    assert [] == idem_rows(charter)
    charter.execute(alice, "doc.charge", {"amount": "1"}, target=doc_id, key="k")
    assert 1 == load(charter, doc_id).counter


def test_purge_removes_only_finished_expired_records_and_then_the_key_is_new(
    database_url, alice, disposing
):
    clock = FrozenClock(datetime.now(UTC))
    charter = disposing(
        test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS, clock=clock))
    )
    doc_id = create_doc(charter, alice)
    charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="old")
    assert 0 == charter.purge_idempotency()
    assert charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="old").replayed
    clock.advance(timedelta(hours=24, seconds=1))
    assert 1 == charter.purge_idempotency()
    again = charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="old")
    assert (False, 2) == (again.replayed, load(charter, doc_id).counter)


# -- concurrency on PostgreSQL -------------------------------------------------------------


@pytest.fixture
def pg(pg_schema: str):
    from .conftest import _truncate_pg

    _truncate_pg(pg_schema)
    instance = test_app.build(Charter(database_url=pg_schema, audit_keys=AUDIT_KEYS))
    yield instance
    instance.engine.dispose()


@pytest.mark.postgres
def test_fifty_concurrent_duplicates_execute_once_and_all_see_the_same_outcome(pg, alice):
    doc_id = create_doc(pg, alice)
    workers = 50
    barrier = threading.Barrier(workers)

    def attempt():
        barrier.wait()
        return pg.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="pay-1")

    with ThreadPoolExecutor(workers) as pool:
        outcomes = [f.result() for f in [pool.submit(attempt) for _ in range(workers)]]
    assert 1 == load(pg, doc_id).counter
    assert 1 == sum(not o.replayed for o in outcomes)
    assert 1 == len({repr(o.body) for o in outcomes})
    assert pg.verify_audit().ok


@pytest.mark.postgres
def test_different_keys_from_one_user_all_run(pg, alice):
    doc_ids = [create_doc(pg, alice) for _ in range(8)]
    barrier = threading.Barrier(len(doc_ids))

    def attempt(i: int, doc_id: int):
        barrier.wait()
        for j in range(5):
            pg.execute(alice, "doc.charge", {"amount": "1"}, target=doc_id, key=f"k-{i}-{j}")

    with ThreadPoolExecutor(len(doc_ids)) as pool:
        for f in [pool.submit(attempt, i, d) for i, d in enumerate(doc_ids)]:
            f.result()
    assert [5] * len(doc_ids) == [load(pg, d).counter for d in doc_ids]


def _duplicate_worker(url: str, doc_id: int, threads: int, barrier, results) -> None:
    charter = test_app.build(Charter(database_url=url, audit_keys=AUDIT_KEYS))
    actor = Actor.make("alice", "acme", roles={"member"})
    barrier.wait()

    def attempt():
        return charter.execute(actor, "doc.charge", {"amount": "5"}, target=doc_id, key="multi")

    with ThreadPoolExecutor(threads) as pool:
        outcomes = [f.result() for f in [pool.submit(attempt) for _ in range(threads)]]
    results.put(sum(not o.replayed for o in outcomes))
    charter.engine.dispose()


@pytest.mark.postgres
@pytest.mark.slow
def test_duplicates_from_several_processes_execute_once(pg, alice, pg_schema):
    doc_id = create_doc(pg, alice)
    ctx = multiprocessing.get_context("spawn")
    processes, threads = 5, 10
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_duplicate_worker, args=(pg_schema, doc_id, threads, barrier, results))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    executed = sum(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert (1, 1) == (executed, load(pg, doc_id).counter)


# -- crashes -----------------------------------------------------------------------------


def _crashing_worker(url: str, doc_id: int, point: str) -> None:
    charter = test_app.build(Charter(database_url=url, audit_keys=AUDIT_KEYS))
    actor = Actor.make("alice", "acme", roles={"member"})
    if point == "before_commit":
        event.listen(charter.runtime.sessions, "before_commit", lambda s: os._exit(17))
    else:
        event.listen(charter.runtime.sessions, "after_commit", lambda s: os._exit(17))
    charter.execute(actor, "doc.charge", {"amount": "5"}, target=doc_id, key="crash")
    os._exit(0)  # pragma: no cover - the listener exits first


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_a_crash_leaves_nothing_or_everything_and_the_retry_runs_once(
    charter, alice, point, database_url
):
    doc_id = create_doc(charter, alice)
    proc = multiprocessing.get_context("spawn").Process(
        target=_crashing_worker, args=(database_url, doc_id, point)
    )
    proc.start()
    proc.join(60)
    assert 17 == proc.exitcode
    expected_before = 0 if point == "before_commit" else 1
    assert expected_before == load(charter, doc_id).counter
    retry = charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="crash")
    assert (point == "after_commit") == retry.replayed
    assert 1 == load(charter, doc_id).counter
    report = charter.verify_audit()
    assert report.ok, report.problems
    with charter.session() as s:
        assert 1 == s.execute(select(func.count()).select_from(idempotency_table)).scalar_one()


def test_another_instance_without_the_memory_replays_from_the_database(
    charter, alice, database_url
):
    doc_id = create_doc(charter, alice)
    first = charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="shared")
    other = test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    try:
        again = other.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="shared")
        assert (True, first.body) == (again.replayed, again.body)
        with pytest.raises(IdempotencyKeyReused):
            other.execute(alice, "doc.charge", {"amount": "6"}, target=doc_id, key="shared")
    finally:
        other.engine.dispose()
    assert 1 == load(charter, doc_id).counter


def test_a_cold_replay_answers_what_a_warm_one_answers_success_and_stored_error(
    charter, alice, database_url
):
    """A replay answered from the database (another instance, nothing in memory) is the one
    the instance that ran the call gives from its memory, field by field."""
    doc_id = create_doc(charter, alice)
    first = charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="ok")
    warm = charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="ok")
    with pytest.raises(CharterError) as refused:
        charter.execute(alice, "doc.limited", {"amount": "500"}, target=doc_id, key="no")
    other = test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    try:
        cold = other.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="ok")
        with pytest.raises(CharterError) as cold_refused:
            other.execute(alice, "doc.limited", {"amount": "500"}, target=doc_id, key="no")
    finally:
        other.engine.dispose()
    fields = ("status", "body", "resource_id", "version", "balance", "replayed")
    assert [getattr(warm, f) for f in fields] == [getattr(cold, f) for f in fields]
    assert (first.body, True) == (cold.body, cold.replayed)
    error, replayed = refused.value, cold_refused.value
    assert (error.code, error.status, error.message) == (
        replayed.code, replayed.status, replayed.message,
    )  # fmt: skip
    assert "true" == replayed.headers["Idempotent-Replayed"]
    assert 1 == load(charter, doc_id).counter


@pytest.mark.postgres
def test_a_cold_answer_is_audited_in_its_claims_one_transaction(pg, alice, pg_schema):
    """A retry another worker answers from the database (a replay, a 422) writes its entry in
    the transaction that found the key taken: one connection, one COMMIT, no ROLLBACK, and
    the entry is durable and chained (the trail verifies)."""
    doc_id = create_doc(pg, alice)
    pg.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="one-txn")

    def counted(amount: str) -> tuple[Any, dict[str, int]]:
        """The call on a new worker (nothing in memory), and its connections and COMMITs."""
        cold = test_app.build(Charter(database_url=pg_schema, audit_keys=AUDIT_KEYS))
        seen = {"checkout": 0, "commit": 0, "rollback": 0}

        def count(name: str) -> Any:
            def listener(*_: Any) -> None:
                seen[name] += 1

            return listener

        event.listen(cold.engine.pool, "checkout", count("checkout"))
        for name in ("commit", "rollback"):
            event.listen(cold.engine, name, count(name))
        try:
            return cold.execute(alice, "doc.charge", {"amount": amount}, target=doc_id,
                                key="one-txn"), seen  # fmt: skip
        except IdempotencyKeyReused as exc:
            return exc, seen
        finally:
            cold.engine.dispose()

    again, seen = counted("5")
    assert again.replayed
    assert {"checkout": 1, "commit": 1, "rollback": 0} == seen
    refused, seen = counted("6")  # another request under the key: 422, audited
    assert isinstance(refused, IdempotencyKeyReused)
    assert {"checkout": 1, "commit": 1, "rollback": 0} == seen
    rows = [r for r in audit_rows(pg) if r["idempotency_key"] == "one-txn"]
    assert [("ok", False), ("ok", True), ("idempotency_key_reused", False)] == [
        (r["outcome"], r["replayed"]) for r in rows
    ]
    assert pg.verify_audit().ok
    assert 1 == load(pg, doc_id).counter


@pytest.mark.postgres
def test_a_duplicate_that_waits_too_long_gets_409_with_retry_after(pg, alice, pg_schema):
    from datetime import timedelta as td

    from charter.idempotency import IdempotencyKeyInProgress, claim_statement, claim_values

    doc_id = create_doc(pg, alice)
    impatient = test_app.build(
        Charter(database_url=pg_schema, audit_keys=AUDIT_KEYS, lock_timeout=td(milliseconds=200))
    )
    holder = pg.runtime.sessions()
    try:
        holder.execute(
            claim_statement(
                "postgresql",
                claim_values(
                    tenant="acme",
                    subject="alice",
                    key="slow",
                    fp="x",
                    action="doc.charge",
                    now=datetime.now(UTC),
                    retention=td(hours=1),
                ),
            )
        )  # held, uncommitted
        with pytest.raises(IdempotencyKeyInProgress) as info:
            impatient.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="slow")
        assert (409, "1") == (info.value.status, info.value.headers["Retry-After"])
    finally:
        holder.rollback()
        holder.close()
        impatient.engine.dispose()
    assert 0 == load(pg, doc_id).counter


@pytest.mark.postgres
def test_a_cold_retry_neither_waits_on_the_records_lock_nor_needs_the_record(pg, alice, pg_schema):
    """The claiming SELECT answers a committed key itself: it locks nothing, reads no record."""
    from datetime import timedelta as td

    from sqlalchemy import text

    doc_id = create_doc(pg, alice)
    first = pg.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="cold")
    cold = test_app.build(
        Charter(database_url=pg_schema, audit_keys=AUDIT_KEYS, lock_timeout=td(milliseconds=300))
    )
    holder = pg.engine.connect()
    try:
        holder.execute(text("SELECT id FROM test_docs WHERE id = :i FOR UPDATE"), {"i": doc_id})
        again = cold.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="cold")
        assert (True, first.body, first.version) == (again.replayed, again.body, again.version)
        with pytest.raises(IdempotencyKeyReused):  # another request under the key: 422
            cold.execute(alice, "doc.charge", {"amount": "6"}, target=doc_id, key="cold")
        holder.rollback()
        holder.execute(text("DELETE FROM test_docs WHERE id = :i"), {"i": doc_id})
        holder.commit()
        gone = test_app.build(Charter(database_url=pg_schema, audit_keys=AUDIT_KEYS))
        try:  # a third worker, after the record was deleted: still the replay, not a 404
            late = gone.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="cold")
            assert (True, first.body) == (late.replayed, late.body)
        finally:
            gone.engine.dispose()
    finally:
        holder.close()
        cold.engine.dispose()
    replays = [r for r in audit_rows(pg) if r["idempotency_key"] == "cold" and r["replayed"]]
    assert 2 == len(replays)
    report = pg.verify_audit()
    assert report.ok, report.problems


# -- fingerprints, replays and the credential (regressions) ---------------------------------

from decimal import Decimal as _D  # noqa: E402
from typing import Annotated  # noqa: E402

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, SecretStr  # noqa: E402

from charter.audit import AuditKeyring  # noqa: E402
from charter.idempotency.keys import fingerprint, fingerprint_key  # noqa: E402

KEY = fingerprint_key(AuditKeyring(AUDIT_KEYS))


class _Amount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: _D


class _Transfer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to_account: str = Field(exclude=True)
    amount: Annotated[_D, PlainSerializer(lambda v: round(v), return_type=int)]
    pin: SecretStr


def _declare_amount(charter: Charter) -> None:
    @charter.action("amount.record", input=_Amount, allow=True)
    def record(ctx, _, data: _Amount) -> dict:
        return {"amount": str(data.amount)}


def test_a_fingerprint_covers_excluded_fields_serialized_values_and_secrets():
    def fp(account: str, amount: str, pin: str) -> str:
        return fingerprint("transfer", None, _Transfer(to_account=account, amount=amount, pin=pin),
                           key=KEY)  # fmt: skip

    base = fp("ACC-1", "10.2", "1111")
    assert base == fp("ACC-1", "10.20", "1111")
    assert base not in {fp("ACC-2", "10.2", "1111"), fp("ACC-1", "9.8", "1111"),
                        fp("ACC-1", "10.2", "1112")}  # fmt: skip


def test_equal_amounts_share_a_fingerprint_and_amounts_past_28_digits_do_not():
    def fp(amount: str) -> str:
        return fingerprint("amount.record", None, _Amount(amount=amount), key=KEY)

    assert 1 == len({fp("5"), fp("5.00"), fp("5.000"), fp("5E+0"), fp("0.5E+1")})
    assert fp("1.00000000000000000000000000001") != fp("1.00000000000000000000000000009")
    assert fp("0") == fp("-0.00")


def test_a_fingerprint_is_keyed_by_the_servers_secret_and_stable_across_a_rotation():
    """A stored fingerprint of a PIN cannot be brute-forced without the key; adding a newer
    audit key (rotation) changes no fingerprint, so a retry across it still matches."""
    data = _Transfer(to_account="A", amount="1", pin="1234")
    other = fingerprint_key(AuditKeyring({"k": "another-secret-of-16-bytes-or-more"}))
    rotated = fingerprint_key(AuditKeyring({"new": "a-newer-audit-key-of-16-bytes", **AUDIT_KEYS}))
    assert fingerprint("t", None, data, key=KEY) != fingerprint("t", None, data, key=other)
    assert KEY == rotated
    assert all(KEY != value.encode() for value in AUDIT_KEYS.values())


def test_the_same_key_with_another_secret_is_another_request(charter, alice):
    charter.execute(alice, "doc.create", {"title": "x", "api_token": "tok_A"}, key="sec-1")
    with pytest.raises(IdempotencyKeyReused):
        charter.execute(alice, "doc.create", {"title": "x", "api_token": "tok_B"}, key="sec-1")
    assert charter.execute(
        alice, "doc.create", {"title": "x", "api_token": "tok_A"}, key="sec-1"
    ).replayed


def test_the_same_key_with_an_amount_differing_past_28_digits_is_another_request(charter, alice):
    _declare_amount(charter)
    charter.execute(alice, "amount.record", {"amount": "1.00000000000000000000000000001"}, key="d")
    with pytest.raises(IdempotencyKeyReused):
        charter.execute(alice, "amount.record", {"amount": "1.00000000000000000000000000009"},
                        key="d")  # fmt: skip
    assert charter.execute(alice, "amount.record", {"amount": "1.000000000000000000000000000010"},
                           key="d").replayed  # fmt: skip


@pytest.mark.parametrize("amount", ["1E+1000000", "1E+99999999", "-1E-99999999"])
def test_a_keyed_amount_with_a_huge_exponent_runs_as_the_unkeyed_call_does(charter, alice, amount):
    _declare_amount(charter)
    assert 200 == charter.execute(alice, "amount.record", {"amount": amount}).status
    first = charter.execute(alice, "amount.record", {"amount": amount}, key="huge")
    assert (200, True) == (first.status, charter.execute(
        alice, "amount.record", {"amount": amount}, key="huge").replayed)  # fmt: skip


def _denials(charter: Charter, key: str) -> list[tuple[str, str | None, str | None]]:
    return [
        (r["decision"], r["rule"], r["real_actor"])
        for r in audit_rows(charter)
        if r["idempotency_key"] == key and r["decision"] == "deny"
    ]


def test_a_credential_without_the_scope_gets_no_replay_from_memory_or_the_database(
    charter, alice, database_url
):
    doc_id = create_doc(charter, alice)
    charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="pay-1")
    other = test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    read_only = Actor.make("alice", "acme", roles={"member"}, scopes={"test_docs:read"})
    try:
        for worker in (charter, other):  # this worker's cache, then another's lookup
            with pytest.raises(Forbidden) as refused:
                worker.execute(read_only, "doc.charge", {"amount": "5"}, target=doc_id,
                               key="pay-1")  # fmt: skip
            assert 403 == refused.value.status
    finally:
        other.engine.dispose()
    assert [("deny", "scope", None)] * 2 == _denials(charter, "pay-1")
    assert 1 == load(charter, doc_id).counter


def test_an_impersonator_without_a_grant_for_the_subject_gets_no_replay(charter, database_url):
    """Refused as a new call is (404: the support user may not read the editor's document)."""
    erin = Actor.make("erin", "acme", roles={"editor"})  # the grant covers members only
    sam = Actor.make("sam", "acme", kind="support", roles={"support"})
    doc_id = create_doc(charter, erin)
    charter.execute(erin, "doc.charge", {"amount": "5"}, target=doc_id, key="erin-1")
    other = test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    try:
        for worker in (charter, other):
            for key in ("fresh", "erin-1"):  # a new key and erin's: the same answer
                with pytest.raises(CharterError) as refused:
                    worker.execute(sam.impersonate(erin), "doc.charge", {"amount": "5"},
                                   target=doc_id, key=key, reason="help")  # fmt: skip
                assert (404, "not_found") == (refused.value.status, refused.value.code)
    finally:
        other.engine.dispose()
    assert [("deny", "impersonation-grant", "sam")] * 2 == _denials(charter, "erin-1")
    assert 1 == load(charter, doc_id).counter


def test_an_impersonator_with_a_grant_for_the_subject_gets_the_replay(charter, alice):
    sam = Actor.make("sam", "acme", kind="support", roles={"support"}, scopes={"test_docs:write"})
    doc_id = create_doc(charter, alice)
    first = charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="al-1")
    again = charter.execute(sam.impersonate(alice), "doc.charge", {"amount": "5"},
                            target=doc_id, key="al-1", reason="help")  # fmt: skip
    assert (True, first.body) == (again.replayed, again.body)


def test_a_client_key_may_not_hold_the_batch_item_separator(charter, alice):
    doc_id = create_doc(charter, alice)
    with pytest.raises(IdempotencyKeyInvalid) as refused:
        charter.execute(alice, "doc.charge", {"amount": "5"}, target=doc_id, key="run-7#0")
    assert (400, "idempotency_key_invalid") == (refused.value.status, refused.value.code)
    assert "'#'" in refused.value.message
    assert ([], 0) == (idem_rows(charter), load(charter, doc_id).counter)
