"""The audit trail is tamper-evident: each kind of tampering is detected and located."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, select, text, update

from charter import Actor, Charter
from charter.audit import AuditKeyring, audit_table, checkpoint_table, digest_input

from .test_gate import create_doc


@pytest.fixture
def trail(charter: Charter, alice: Actor) -> list[dict]:
    """Six entries in one stream (one thread reuses its stream)."""
    doc_id = create_doc(charter, alice)
    for i in range(5):
        charter.execute(alice, "doc.rename", {"title": f"t{i}"}, target=doc_id)
    with charter.session() as s:
        rows = [
            dict(r._mapping) for r in s.execute(select(audit_table).order_by(audit_table.c.seq))
        ]
    assert 1 == len({r["stream"] for r in rows})
    assert [1, 2, 3, 4, 5, 6] == [r["seq"] for r in rows]
    return rows


def tamper(charter: Charter, *statements) -> None:
    with charter.engine.begin() as conn:
        for stmt in statements:
            conn.execute(stmt)


def kinds(charter: Charter) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in charter.verify_audit().problems]


def test_an_untouched_trail_verifies(charter, trail):
    report = charter.verify_audit()
    assert (True, 6, 1) == (report.ok, report.entries, report.streams)


def test_a_modified_entry_is_detected_and_located(charter, trail):
    tamper(
        charter, update(audit_table).where(audit_table.c.seq == 3).values(reason="nothing to see")
    )
    problems = charter.verify_audit().problems
    assert [("modified", 3)] == [(p.kind, p.seq) for p in problems]
    assert trail[2]["id"] == problems[0].entry_id


def test_a_modified_entry_with_a_recomputed_plain_hash_is_still_detected(charter, trail):
    tamper(
        charter,
        update(audit_table)
        .where(audit_table.c.seq == 2)
        .values(outcome="ok", decision="deny", hash="0" * 64),
    )
    assert [("modified", 2)] == kinds(charter)


def test_a_deleted_entry_in_the_middle_is_detected(charter, trail):
    tamper(charter, audit_table.delete().where(audit_table.c.seq == 4))
    assert [("deleted", 4)] == kinds(charter)


def test_a_deleted_tail_is_detected_once_checkpointed(charter, trail):
    charter.checkpoint_audit()
    tamper(charter, audit_table.delete().where(audit_table.c.seq >= 5))
    problems = charter.verify_audit().problems
    assert [("deleted", 5)] == [(p.kind, p.seq) for p in problems]
    assert "positions 5-6" in problems[0].detail


def test_an_inserted_entry_is_detected(charter, trail):
    forged = {k: v for k, v in trail[-1].items() if k != "id"}
    forged.update(seq=7, prev_hash=trail[-1]["hash"], reason="backdated approval")
    tamper(charter, insert(audit_table).values(**forged))
    assert [("inserted", 7)] == kinds(charter)


def test_an_entry_inserted_into_the_middle_is_detected(charter, trail):
    # Shift the tail to make room, as an attacker must, then insert at position 3.
    forged = {k: v for k, v in trail[2].items() if k != "id"}
    forged.update(reason="forged")
    tamper(
        charter,
        update(audit_table).where(audit_table.c.seq >= 3).values(seq=audit_table.c.seq + 100),
        update(audit_table).where(audit_table.c.seq >= 103).values(seq=audit_table.c.seq - 99),
        insert(audit_table).values(**forged),
    )
    assert [("inserted", 3)] == kinds(charter)


def test_reordered_entries_are_detected(charter, trail):
    tamper(
        charter,
        update(audit_table).where(audit_table.c.seq == 2).values(seq=99),
        update(audit_table).where(audit_table.c.seq == 5).values(seq=2),
        update(audit_table).where(audit_table.c.seq == 99).values(seq=5),
    )
    found = kinds(charter)
    assert {("reordered", 2), ("reordered", 5)} == set(found)


def test_a_forged_checkpoint_is_detected(charter, trail):
    charter.checkpoint_audit()
    tamper(charter, update(checkpoint_table).values(heads={}))
    assert [("checkpoint", None)] == kinds(charter)


def test_a_deleted_checkpoint_in_the_middle_is_detected(charter, trail, alice):
    for _ in range(3):
        charter.checkpoint_audit()
    tamper(charter, checkpoint_table.delete().where(checkpoint_table.c.id == 2))
    assert [("checkpoint", None)] == kinds(charter)


def test_entries_written_with_an_older_key_still_verify_after_rotation(
    charter, trail, database_url
):
    rotated = Charter(
        database_url=database_url,
        audit_keys={"k2": "a-brand-new-key-0123456789", "k1": "test-audit-key-0123456789abcdef"},
    )
    try:
        assert rotated.verify_audit().ok
        assert "k2" == rotated.keyring.current_id
    finally:
        rotated.engine.dispose()


def test_without_the_key_nothing_verifies(charter, trail, database_url):
    stranger = Charter(database_url=database_url, audit_keys={"k1": "somebody-elses-key-123"})
    try:
        problems = stranger.verify_audit().problems
        assert {r["id"] for r in trail} == {p.entry_id for p in problems}
    finally:
        stranger.engine.dispose()


def test_history_lists_a_records_entries_in_order(charter, trail):
    history = charter.history("test_docs", trail[0]["resource_id"])
    assert ["doc.create"] + ["doc.rename"] * 5 == [h["action"] for h in history]


def test_the_keyring_redacts_its_secrets():
    ring = AuditKeyring({"k1": "super-secret-value-1234"})
    assert "super-secret" not in repr(ring)


def test_input_digests_redact_secret_looking_fields():
    assert digest_input({"password": "a", "x": 1}) == digest_input({"password": "b", "x": 1})
    assert digest_input({"x": 1}) != digest_input({"x": 2})


def test_raw_sql_cannot_skip_the_stream_position_constraint(charter, trail):
    duplicate = {k: v for k, v in trail[0].items() if k != "id"}
    with pytest.raises(Exception, match=r"(?i)unique"):
        tamper(charter, insert(audit_table).values(**duplicate))
    tamper(charter, text("SELECT 1"))


# -- the checkpoint chain (issue 9) -------------------------------------------------------


def _legacy_checkpoint(charter: Charter, heads: dict, prev: str) -> dict:
    """A checkpoint as Charter signed it before checkpoints had positions (format v1)."""
    import json
    from datetime import UTC, datetime

    at = datetime(2026, 1, 1, tzinfo=UTC)
    message = json.dumps(
        ["charter-checkpoint-v1", at.replace(tzinfo=None).isoformat(timespec="microseconds"),
         heads, prev], sort_keys=True, separators=(",", ":"),
    ).encode()  # fmt: skip
    row = {"at": at, "heads": heads, "prev_signature": prev, "key_id": "k1",
           "signature": charter.keyring.mac(message)}  # fmt: skip
    tamper(charter, insert(checkpoint_table).values(**row))
    return row


def test_checkpoints_signed_before_positions_still_verify_and_the_chain_goes_on(charter, trail):
    heads = {trail[0]["stream"]: [6, trail[-1]["hash"]]}
    first = _legacy_checkpoint(charter, heads, "")
    _legacy_checkpoint(charter, heads, first["signature"])
    row = charter.checkpoint_audit()
    assert (1, None) == (row["position"], row["anchor"])
    assert charter.verify_audit().ok
    tamper(charter, audit_table.delete().where(audit_table.c.seq == 6))
    assert [("deleted", 6)] == kinds(charter)


def test_a_legacy_checkpoint_cannot_be_passed_off_with_a_position(charter, trail):
    heads = {trail[0]["stream"]: [6, trail[-1]["hash"]]}
    _legacy_checkpoint(charter, heads, "")
    tamper(charter, update(checkpoint_table).values(position=1))
    assert [("checkpoint", None)] == kinds(charter)


def test_the_kind_of_a_checkpoint_is_signed(charter, trail):
    charter.checkpoint_audit()
    tamper(charter, update(checkpoint_table).values(kind="prune"))
    assert [("checkpoint", None)] == kinds(charter)


def test_a_legacy_checkpoint_is_read_as_plain_whatever_its_unsigned_columns_say(charter, trail):
    """Format v1 signs neither kind nor anchor: a changed one is reported, never believed."""
    heads = {trail[0]["stream"]: [6, trail[-1]["hash"]]}
    _legacy_checkpoint(charter, heads, "")
    tamper(charter, update(checkpoint_table).values(kind="prune", anchor="f" * 32))
    (problem,) = charter.verify_audit().problems
    assert ("checkpoint", None) == (problem.kind, problem.seq)
    assert "kind 'prune' and anchor 'ffff" in problem.detail
    tamper(charter, audit_table.delete().where(audit_table.c.seq == 6))
    assert [("checkpoint", None), ("deleted", 6)] == kinds(charter)  # the prune excuses nothing


@pytest.mark.postgres
def test_concurrent_checkpoints_each_take_their_own_position(pg_schema):
    """PostgreSQL, 8 threads at once: the loser of each race re-reads the end and retries."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from .conftest import AUDIT_KEYS, _truncate_pg

    _truncate_pg(pg_schema)
    writers = 8
    # One Charter per writer, as separate processes would be (one Charter's own
    # checkpoints never overlap).
    charters = [Charter(database_url=pg_schema, audit_keys=AUDIT_KEYS) for _ in range(writers)]
    barrier = threading.Barrier(writers)

    def write(charter: Charter) -> int:
        barrier.wait()
        return int(charter.checkpoint_audit()["position"])

    try:
        with ThreadPoolExecutor(writers) as pool:
            positions = sorted(pool.map(write, charters))
        assert list(range(1, writers + 1)) == positions
        report = charters[0].verify_audit()
        assert (True, writers) == (report.ok, report.checkpoints)
    finally:
        for charter in charters:
            charter.close()
