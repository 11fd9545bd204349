"""Issue 9, section 1: the audit trail cannot be erased without ``charter audit verify`` noticing.

Each test tampers as someone with write access to the database (or to the
anchor) but without the audit key would, then reads what verification says
and where. Before the anchor, deleting the newest checkpoint with the entries
only it covered, deleting every checkpoint and then a stream's tail, or
emptying both tables, all verified clean. With an anchor each is reported;
without one they still go unnoticed (nothing outside the database remembers
them), and the report says so plainly: that is the documented behaviour.

The history every test starts from, in one stream::

    entries 1-3   checkpoint 1 (anchor record 2)
    entries 4-6   checkpoint 2 (anchor record 3)
    entries 7-8   not checkpointed yet: unprotected until the next checkpoint
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, select, text, update
from typer.testing import CliRunner

from charter import Actor, Charter
from charter.audit import (
    ANCHOR_GRACE,
    anchor_from_uri,
    audit_table,
    checkpoint_table,
    link_table,
)
from charter.audit.checkpoint import checkpoint_message, read_heads
from charter.audit.verify import NO_ANCHOR
from charter.cli import app
from charter.demo.app import create_app
from charter.errors import AuditIntegrityError, ConfigurationError
from charter.settings import Settings
from charter.storage import make_engine
from charter.testing import FrozenClock

from .. import app as test_app
from ..conftest import AUDIT_KEYS
from ..test_gate import create_doc

START = datetime(2026, 3, 1, 12, tzinfo=UTC)
AFTER_GRACE = ANCHOR_GRACE + timedelta(seconds=1)
runner = CliRunner()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(START)


@pytest.fixture(params=["file", "database"])
def anchor_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A JSON-lines file, or a table in another database (SQLite here)."""
    if request.param == "file":
        return str(tmp_path / "audit.anchor.jsonl")
    return f"sqlite:///{tmp_path / 'anchor.db'}"


def build(database_url: str, clock: FrozenClock, anchor: str | None) -> Charter:
    return test_app.build(
        Charter(
            database_url=database_url, audit_keys=AUDIT_KEYS, clock=clock,
            audit_anchor=anchor, checkpoint_interval=None,  # checkpoints only when written here
        )
    )  # fmt: skip


@pytest.fixture
def anchored(database_url: str, clock: FrozenClock, anchor_uri: str) -> Iterator[Charter]:
    charter = build(database_url, clock, anchor_uri)
    yield charter
    charter.close()


@pytest.fixture
def unanchored(database_url: str, clock: FrozenClock) -> Iterator[Charter]:
    charter = build(database_url, clock, None)
    yield charter
    charter.close()


def write_history(charter: Charter, clock: FrozenClock) -> str:
    """The history of the module docstring; returns the stream."""
    alice = Actor.make("alice", "acme", roles={"member"})
    doc = create_doc(charter, alice)
    rename = lambda i: charter.execute(alice, "doc.rename", {"title": f"t{i}"}, target=doc)  # noqa: E731
    for i in range(2):
        rename(i)
    assert charter.checkpoint_now() is not None
    clock.advance(timedelta(days=1))
    for i in range(3):
        rename(10 + i)
    assert charter.checkpoint_now() is not None
    for i in range(2):
        rename(20 + i)
    with charter.session() as s:
        seqs = s.execute(select(audit_table.c.stream, audit_table.c.seq)).all()
    assert [1, 2, 3, 4, 5, 6, 7, 8] == sorted(seq for _, seq in seqs)
    assert charter.verify_audit().ok
    return str(seqs[0][0])


def tamper(charter: Charter, *statements) -> None:
    with charter.engine.begin() as conn:
        for stmt in statements:
            conn.execute(stmt)


def found(charter: Charter) -> dict[tuple[str, int | None], str]:
    return {(p.kind, p.seq): p.detail for p in charter.verify_audit().problems}


def anchor_texts(uri: str) -> list[str]:
    anchor = anchor_from_uri(uri)
    assert anchor is not None
    try:
        return [record for _, record in anchor.records()]
    finally:
        anchor.close()


def rewrite_anchor(uri: str, records: list[str]) -> None:
    """Replace what the anchor holds, as someone with write access to it would."""
    if "://" not in uri:
        Path(uri).write_text("".join(f"{r}\n" for r in records))
        return
    engine = make_engine(uri)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM charter_audit_anchor"))
            for position, record in enumerate(records, 1):
                conn.execute(
                    text("INSERT INTO charter_audit_anchor (position, record) VALUES (:p, :r)"),
                    {"p": position, "r": record},
                )
    finally:
        engine.dispose()


NEWEST_CHECKPOINT = checkpoint_table.c.position == 2


# -- the three erasures of the issue -----------------------------------------------------


def test_deleting_the_newest_checkpoint_with_the_entries_only_it_covered_is_reported(
    anchored, clock
):
    write_history(anchored, clock)
    tamper(
        anchored,
        delete(checkpoint_table).where(NEWEST_CHECKPOINT),
        delete(audit_table).where(audit_table.c.seq >= 4),
    )
    problems = found(anchored)
    assert {("truncated", None), ("deleted", 4)} == set(problems)
    assert "checkpoints end at checkpoint 1" in problems[("truncated", None)]
    assert "checkpoint 2 deleted" in problems[("truncated", None)]
    assert "positions 4-6" in problems[("deleted", 4)]
    assert "anchor record 3 had seen them" in problems[("deleted", 4)]


def test_without_an_anchor_that_erasure_goes_unnoticed_and_the_report_says_why(unanchored, clock):
    write_history(unanchored, clock)
    tamper(
        unanchored,
        delete(checkpoint_table).where(NEWEST_CHECKPOINT),
        delete(audit_table).where(audit_table.c.seq >= 4),
    )
    report = unanchored.verify_audit()
    assert (True, 3, [NO_ANCHOR]) == (report.ok, report.entries, report.notes)


def test_deleting_every_checkpoint_then_a_streams_tail_is_reported(anchored, clock):
    stream = write_history(anchored, clock)
    tamper(
        anchored,
        delete(checkpoint_table),
        delete(audit_table).where(audit_table.c.seq >= 5),
    )
    problems = anchored.verify_audit().problems
    assert {("truncated", None), ("deleted", 5)} == {(p.kind, p.seq) for p in problems}
    truncated = next(p for p in problems if p.kind == "truncated")
    assert "checkpoints are gone" in truncated.detail
    assert "checkpoints 1-2 deleted" in truncated.detail
    tail = next(p for p in problems if p.kind == "deleted")
    assert (stream, "positions 5-6") == (tail.stream, tail.detail[:13])


def test_without_an_anchor_every_checkpoint_and_a_tail_go_unnoticed(unanchored, clock):
    write_history(unanchored, clock)
    tamper(unanchored, delete(checkpoint_table), delete(audit_table).where(audit_table.c.seq >= 5))
    report = unanchored.verify_audit()
    assert (True, 0, [NO_ANCHOR]) == (report.ok, report.checkpoints, report.notes)


def test_emptying_both_tables_is_reported_as_an_emptied_trail(anchored, clock):
    write_history(anchored, clock)
    tamper(anchored, delete(link_table), delete(audit_table), delete(checkpoint_table))
    report = anchored.verify_audit()
    kinds = {p.kind: p.detail for p in report.problems}
    assert {"emptied", "truncated"} == set(kinds)
    assert "the anchor vouches for 6 entries in 1 stream(s)" in kinds["emptied"]
    assert (0, 0, 3) == (report.entries, report.checkpoints, report.anchor_records)


def test_without_an_anchor_an_emptied_trail_verifies_as_zero_entries(unanchored, clock):
    write_history(unanchored, clock)
    tamper(unanchored, delete(link_table), delete(audit_table), delete(checkpoint_table))
    report = unanchored.verify_audit()
    assert (True, 0, [NO_ANCHOR]) == (report.ok, report.entries, report.notes)


def test_deleting_a_checkpoint_in_the_middle_is_reported_by_the_chain_and_the_anchor(
    anchored, clock
):
    write_history(anchored, clock)
    tamper(anchored, delete(checkpoint_table).where(checkpoint_table.c.position == 1))
    details = [p.detail for p in anchored.verify_audit().problems]
    assert 2 == len(details)
    assert "checkpoint 1 missing before checkpoint 2" in details[0]
    assert "checkpoint 1 missing from the database: deleted (the anchor holds it" in details[1]


# -- attacks on the anchor itself ----------------------------------------------------------


def test_an_edited_anchor_record_is_reported_where(anchored, clock, anchor_uri):
    write_history(anchored, clock)
    records = anchor_texts(anchor_uri)
    # Make the anchor say checkpoint 2 saw only 3 entries, then delete 4-6 to match.
    records[2] = records[2].replace(':[6,"', ':[3,"')
    assert records[2] != anchor_texts(anchor_uri)[2]
    rewrite_anchor(anchor_uri, records)
    problems = {(p.kind, p.detail) for p in anchored.verify_audit().problems}
    where = "line 3" if "://" not in anchor_uri else "row 3"
    assert {("anchor", f"{where} of the anchor has an invalid MAC: edited or forged")} == problems


def test_a_truncated_anchor_is_reported_once_its_last_checkpoint_should_be_there(
    anchored, clock, anchor_uri
):
    write_history(anchored, clock)
    rewrite_anchor(anchor_uri, anchor_texts(anchor_uri)[:-1])
    # A checkpoint is committed, then appended: one younger than the grace may be in flight.
    assert anchored.verify_audit().ok
    clock.advance(AFTER_GRACE)
    (problem,) = anchored.verify_audit().problems
    assert "anchor" == problem.kind
    assert problem.detail.startswith("checkpoint 2 was written to this anchor, which holds no")
    assert "truncated" in problem.detail


def test_an_emptied_anchor_is_reported(anchored, clock, anchor_uri):
    write_history(anchored, clock)
    rewrite_anchor(anchor_uri, [])
    clock.advance(AFTER_GRACE)
    (problem,) = anchored.verify_audit().problems
    assert ("anchor", True) == (problem.kind, "emptied or replaced" in problem.detail)
    assert "checkpoints 1-2" in problem.detail


def test_an_anchor_deleted_and_begun_again_by_the_next_checkpoint_is_reported(
    anchored, clock, anchor_uri
):
    write_history(anchored, clock)
    rewrite_anchor(anchor_uri, [])
    alice = Actor.make("alice", "acme", roles={"member"})
    for _ in range(2):  # the first notices the anchor is gone, the second starts a new one
        anchored.execute(alice, "doc.create", {"title": "later"})
        assert anchored.checkpoint_now() is not None
    assert 2 == len(anchor_texts(anchor_uri))  # a new genesis and one checkpoint
    clock.advance(AFTER_GRACE)
    (problem,) = anchored.verify_audit().problems
    assert "anchor" == problem.kind
    assert problem.detail.startswith("checkpoints 1-3 were written to another anchor")


def test_a_record_removed_from_the_middle_of_the_anchor_is_reported_where(
    anchored, clock, anchor_uri
):
    write_history(anchored, clock)
    records = anchor_texts(anchor_uri)
    rewrite_anchor(anchor_uri, [records[0], records[2]])
    clock.advance(AFTER_GRACE)
    details = [p.detail for p in anchored.verify_audit().problems]
    where = "line 2" if "://" not in anchor_uri else "row 2"
    assert f"anchor record 2 missing before {where}: removed from the anchor" == details[0]
    assert details[1].startswith("checkpoint 1 was written to this anchor")
    assert 2 == len(details)


def test_truncating_the_anchor_and_then_the_trail_to_match_is_still_reported(
    anchored, clock, anchor_uri
):
    """Access to both, but no key: the checkpoint left in the database names the anchor."""
    write_history(anchored, clock)
    rewrite_anchor(anchor_uri, anchor_texts(anchor_uri)[:-1])
    tamper(anchored, delete(audit_table).where(audit_table.c.seq >= 4))
    clock.advance(AFTER_GRACE)
    kinds = {p.kind for p in anchored.verify_audit().problems}
    assert {"anchor", "deleted"} == kinds


# -- pruning for retention ------------------------------------------------------------------


@pytest.fixture(params=["anchored", "unanchored"])
def either(
    request: pytest.FixtureRequest, database_url: str, clock: FrozenClock, anchor_uri: str
) -> Iterator[Charter]:
    charter = build(database_url, clock, anchor_uri if request.param == "anchored" else None)
    yield charter
    charter.close()


def test_pruning_with_its_signed_record_is_not_tampering(either, clock):
    stream = write_history(either, clock)
    pruned = either.prune_audit(START + timedelta(hours=1))  # entries 1-3 are a day older
    assert pruned.record is not None
    assert (3, {stream: 3}) == (
        pruned.entries,
        {s: seq for s, (seq, _) in pruned.record["heads"].items()},
    )
    report = either.verify_audit()
    assert (True, 5) == (report.ok, report.entries), report.problems
    either.execute(Actor.make("alice", "acme", roles={"member"}), "doc.create", {"title": "n"})
    assert either.checkpoint_now() is not None
    assert either.verify_audit().ok


def test_pruning_without_the_record_is_reported_as_deleted_entries(either, clock):
    write_history(either, clock)
    tamper(either, delete(audit_table).where(audit_table.c.at < START + timedelta(hours=1)))
    assert {("deleted", 1)} == set(found(either))
    assert "positions 1-3" in found(either)[("deleted", 1)]


def test_deleting_the_prune_record_afterwards_is_reported(anchored, clock):
    write_history(anchored, clock)
    anchored.prune_audit(START + timedelta(hours=1))
    tamper(anchored, delete(checkpoint_table).where(checkpoint_table.c.kind == "prune"))
    # The anchor's copy of the prune record still accounts for 1-3: the loss is the record.
    assert {("truncated", None)} == set(found(anchored))


def test_without_an_anchor_deleting_the_prune_record_shows_the_entries_missing(unanchored, clock):
    write_history(unanchored, clock)
    unanchored.prune_audit(START + timedelta(hours=1))
    tamper(unanchored, delete(checkpoint_table).where(checkpoint_table.c.kind == "prune"))
    assert {("deleted", 1)} == set(found(unanchored))


def test_a_forged_prune_record_is_reported_and_excuses_nothing(unanchored, clock):
    stream = write_history(unanchored, clock)
    with unanchored.session() as s:
        last = dict(s.execute(select(checkpoint_table).order_by(checkpoint_table.c.id.desc()))
                    .mappings().first())  # fmt: skip
    forged = {k: v for k, v in last.items() if k != "id"}
    forged.update(
        position=3, kind="prune", heads={stream: [6, "0" * 64]}, prev_signature=last["signature"]
    )
    tamper(
        unanchored,
        insert(checkpoint_table).values(**forged),
        delete(audit_table).where(audit_table.c.seq <= 6),
    )
    assert {("checkpoint", None), ("deleted", 1)} == set(found(unanchored))


def legacy_checkpoint(charter: Charter) -> dict:
    """A checkpoint signed before charter_0005: no position, neither kind nor anchor signed."""
    with charter.engine.begin() as conn:
        row = {"at": charter.clock(), "heads": read_heads(conn), "prev_signature": "",
               "position": None, "kind": "checkpoint", "anchor": None, "key_id": "k1"}  # fmt: skip
        row["signature"] = charter.keyring.mac(checkpoint_message(row))
        conn.execute(insert(checkpoint_table), [row])
    return row


def test_an_old_checkpoint_relabelled_prune_excuses_no_deleted_entry(either, clock):
    """Its kind is not signed: a ``prune`` written there is reported, and the entries missing."""
    alice = Actor.make("alice", "acme", roles={"member"})
    for i in range(3):
        either.execute(alice, "doc.create", {"title": f"d{i}"})
    ((stream, (seq, _)),) = legacy_checkpoint(either)["heads"].items()
    for i in range(3):
        either.execute(alice, "doc.create", {"title": f"e{i}"})
    either.checkpoint_audit()  # a positioned checkpoint, anchored, chained after the old one
    clock.advance(AFTER_GRACE)
    assert either.verify_audit().ok
    tamper(
        either,
        update(checkpoint_table).where(checkpoint_table.c.position.is_(None)).values(kind="prune"),
        delete(audit_table).where(audit_table.c.stream == stream, audit_table.c.seq <= seq),
    )
    problems = found(either)
    assert {("checkpoint", None), ("deleted", 1)} == set(problems)
    assert "old format" in problems[("checkpoint", None)]
    assert "kind 'prune'" in problems[("checkpoint", None)]
    assert "positions 1-3" in problems[("deleted", 1)]


def test_pruning_refuses_a_trail_that_does_not_verify(unanchored, clock):
    write_history(unanchored, clock)
    tamper(unanchored, update(audit_table).where(audit_table.c.seq == 2).values(reason="edited"))
    with pytest.raises(AuditIntegrityError, match="would erase the evidence"):
        unanchored.prune_audit(START + timedelta(hours=1))
    with unanchored.session() as s:
        assert 8 == len(s.execute(select(audit_table.c.id)).all())


# -- the command: database URL, audit key and anchor, nothing else ---------------------------


@pytest.fixture
def production(monkeypatch, database_url, anchor_uri):
    """The environment of an operator's shell in production: no token secret anywhere."""
    for name in ("CHARTER_TOKEN_SECRET", "CHARTER_PAYMENTS_WEBHOOK_SECRET", "CHARTER_PAYMENTS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHARTER_ENV", "production")
    monkeypatch.setenv("CHARTER_DATABASE_URL", database_url)
    monkeypatch.setenv("CHARTER_AUDIT_KEY", ",".join(f"{k}:{v}" for k, v in AUDIT_KEYS.items()))
    monkeypatch.setenv("CHARTER_AUDIT_ANCHOR", anchor_uri)


def test_audit_verify_runs_in_production_with_only_the_database_the_key_and_the_anchor(
    production, anchored, clock
):
    write_history(anchored, clock)
    verified = runner.invoke(app, ["audit", "verify"])
    assert 0 == verified.exit_code, verified.output
    assert "verified: 8 entries in 1 streams, 2 checkpoints, anchor " in verified.output
    assert "(3 records), 0 problems" in verified.output
    tamper(
        anchored,
        delete(checkpoint_table).where(NEWEST_CHECKPOINT),
        delete(audit_table).where(audit_table.c.seq >= 4),
    )
    tampered = runner.invoke(app, ["audit", "verify"])
    assert 1 == tampered.exit_code
    assert "truncated: the trail is shorter than the anchor says" in tampered.output
    assert "deleted: stream (stream" in tampered.output
    assert '"kind": "truncated"' in runner.invoke(app, ["audit", "verify", "--json"]).output


def test_audit_checkpoint_and_prune_need_no_token_secret_either(production, anchored, clock):
    write_history(anchored, clock)
    checkpointed = runner.invoke(app, ["audit", "checkpoint"])
    assert (0, True) == (checkpointed.exit_code, "(and anchored)" in checkpointed.output)
    before = (START + timedelta(hours=1)).isoformat()
    pruned = runner.invoke(app, ["audit", "prune", "--before", before, "--yes"])
    assert 0 == pruned.exit_code, pruned.output
    assert "pruned 3 entries in 1 streams" in pruned.output
    assert 0 == runner.invoke(app, ["audit", "verify"]).exit_code


def test_audit_verify_without_an_anchor_in_production_works_and_warns(
    production, monkeypatch, unanchored, clock
):
    monkeypatch.delenv("CHARTER_AUDIT_ANCHOR")
    write_history(unanchored, clock)
    verified = runner.invoke(app, ["audit", "verify"])
    assert 0 == verified.exit_code
    assert "warning: no anchor is configured: nothing outside the database vouches" in (
        " ".join(verified.output.split())
    )
    assert ", no anchor, 0 problems" in verified.output


def test_the_service_still_refuses_to_start_without_a_token_secret(production):
    with pytest.raises(ConfigurationError, match="CHARTER_TOKEN_SECRET"):
        Settings.from_env()
    audit_only = Settings.for_audit()
    assert () == audit_only.token_secrets
    with pytest.raises(ConfigurationError, match="secret"):
        create_app(audit_only)
