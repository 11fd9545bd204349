"""Audit anchors: signed, chained records outside the database, safe for several writers.

The attacks on the trail itself (erasing checkpoints, tails, tables) are in
``tests/attacks/test_audit_erasure.py``; this module attacks the anchor and
the machinery around it: its records, its concurrent writers, the checkpoint
schedule that feeds it, and the settings that choose it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, select, text

from charter import Actor, Charter
from charter.audit import (
    AuditKeyring,
    FileAnchor,
    SqlAnchor,
    anchor_from_uri,
    audit_table,
    checkpoint_table,
    read_anchor,
)
from charter.audit.anchor import anchor_checkpoint, anchor_identity
from charter.audit.checkpoint import write_checkpoint
from charter.errors import AuditIntegrityError, ConfigurationError
from charter.settings import Settings
from charter.testing import FrozenClock

from . import app as test_app
from .conftest import AUDIT_KEYS
from .test_gate import create_doc

KEYRING = AuditKeyring(AUDIT_KEYS)
THREAD = "charter-audit-checkpoints"


def checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD and t.is_alive()]


@pytest.fixture(params=["file", "database"])
def anchor_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A file anchor, or a SQL anchor in another (SQLite) database."""
    if request.param == "file":
        return str(tmp_path / "audit.anchor.jsonl")
    return f"sqlite:///{tmp_path / 'anchor.db'}"


@pytest.fixture
def anchor(anchor_uri: str) -> Iterator[FileAnchor | SqlAnchor]:
    opened = anchor_from_uri(anchor_uri)
    assert isinstance(opened, FileAnchor | SqlAnchor)
    yield opened
    opened.close()


def rows(n: int, identity: str, start: int = 1) -> list[dict]:
    """Checkpoint rows as the checkpoint writer makes them (their content is not re-checked)."""
    at = datetime(2026, 3, 1, tzinfo=UTC)
    return [
        {"at": at, "kind": "checkpoint", "position": p, "signature": f"{p:064x}",
         "heads": {"s": [p, "h" * 64]}, "anchor": identity}
        for p in range(start, start + n)
    ]  # fmt: skip


def filled(anchor, n: int = 4) -> str:
    identity = anchor_identity(anchor, KEYRING, datetime(2026, 3, 1, tzinfo=UTC))
    for row in rows(n, identity):
        anchor_checkpoint(anchor, KEYRING, row)
    return identity


# -- the records -----------------------------------------------------------------------


def test_an_anchor_starts_with_a_genesis_and_chains_every_record(anchor):
    identity = filled(anchor)
    reading = read_anchor(anchor, KEYRING)
    assert ([], identity, 5) == (reading.problems, reading.identity, reading.count)
    assert [1, 2, 3, 4, 5] == [r.position for r in reading.records]
    assert [None, 1, 2, 3, 4] == [r.checkpoint for r in reading.records]
    assert identity == anchor_identity(anchor, KEYRING, datetime.now(UTC))  # no second genesis


def test_each_record_is_signed_with_the_key_id_and_chained_to_the_one_before(tmp_path):
    anchor = FileAnchor(tmp_path / "a.jsonl")
    filled(anchor, 2)
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert {"k1"} == {r["key_id"] for r in records}
    assert all(len(r["mac"]) == 64 for r in records)
    import hashlib

    assert [""] + [hashlib.sha256(line.encode()).hexdigest() for line in lines[:-1]] == [
        r["prev"] for r in records
    ]


def test_an_edited_record_is_reported_with_its_line(tmp_path):
    path = tmp_path / "a.jsonl"
    anchor = FileAnchor(path)
    filled(anchor, 3)
    lines = path.read_text().splitlines()
    record = json.loads(lines[2])
    record["heads"]["s"][0] = 1  # claim the trail was shorter
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    reading = read_anchor(anchor, KEYRING)
    assert ["line 3 of the anchor has an invalid MAC: edited or forged"] == reading.problems
    assert 3 not in [r.position for r in reading.records]  # a forged record vouches for nothing


def test_a_record_removed_from_the_middle_is_reported_where(tmp_path):
    path = tmp_path / "a.jsonl"
    anchor = FileAnchor(path)
    filled(anchor, 4)
    lines = path.read_text().splitlines()
    del lines[2]
    path.write_text("\n".join(lines) + "\n")
    assert ["anchor record 3 missing before line 3: removed from the anchor"] == read_anchor(
        anchor, KEYRING
    ).problems


def test_records_swapped_or_spliced_from_another_anchor_are_reported(tmp_path):
    path, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    filled(FileAnchor(path), 3)
    filled(FileAnchor(other), 3)
    lines, foreign = path.read_text().splitlines(), other.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join([*lines, foreign[-1]]) + "\n")
    problems = read_anchor(FileAnchor(path), KEYRING).problems
    assert any("line 2" in p and "missing" in p for p in problems)
    assert any("line 3" in p and "does not follow" in p for p in problems)
    assert any("line 5" in p and "belongs to another anchor" in p for p in problems)


def test_a_record_signed_with_another_key_is_forged_and_an_older_key_still_verifies(tmp_path):
    anchor = FileAnchor(tmp_path / "a.jsonl")
    filled(anchor, 2)
    rotated = AuditKeyring({"k2": "a-brand-new-key-0123456789", **AUDIT_KEYS})
    assert [] == read_anchor(anchor, rotated).problems
    stranger = AuditKeyring({"k1": "somebody-elses-key-123"})
    assert 3 == len(read_anchor(anchor, stranger).problems)


def test_appending_after_an_edited_last_record_refuses_to_chain(tmp_path):
    path = tmp_path / "a.jsonl"
    anchor = FileAnchor(path)
    identity = filled(anchor, 1)
    path.write_text(path.read_text().replace('"position":2', '"position":9'))
    with pytest.raises(AuditIntegrityError, match="nothing can be chained"):
        anchor_checkpoint(anchor, KEYRING, rows(1, identity, start=2)[0])


def test_a_line_cut_short_by_a_crash_stays_visible_and_the_chain_goes_on(tmp_path):
    path = tmp_path / "a.jsonl"
    anchor = FileAnchor(path)
    identity = filled(anchor, 1)
    with path.open("a") as f:
        f.write('{"anchor":"')  # the crash
    anchor_checkpoint(anchor, KEYRING, rows(1, identity, start=2)[0])
    reading = read_anchor(anchor, KEYRING)
    assert ["line 3 of the anchor is not an anchor record (edited, or a write cut short)"] == (
        reading.problems
    )
    assert [1, 2, 3] == [r.position for r in reading.records]


def test_an_anchor_replaced_since_it_was_read_is_not_written_to(tmp_path):
    path = tmp_path / "a.jsonl"
    anchor = FileAnchor(path)
    identity = filled(anchor, 1)
    path.unlink()
    anchor_identity(anchor, KEYRING, datetime.now(UTC))  # somebody starts a new one
    with pytest.raises(AuditIntegrityError, match="emptied or replaced"):
        anchor_checkpoint(anchor, KEYRING, rows(1, identity, start=2)[0])


def test_anchors_are_chosen_by_uri(tmp_path):
    assert None is anchor_from_uri(None)
    assert None is anchor_from_uri("none")
    assert isinstance(anchor_from_uri(f"file://{tmp_path}/a.jsonl"), FileAnchor)
    assert Path(f"{tmp_path}/a.jsonl") == anchor_from_uri(f"file://{tmp_path}/a.jsonl").path
    assert isinstance(anchor_from_uri("relative.anchor.jsonl"), FileAnchor)
    sql = anchor_from_uri(f"sqlite:///{tmp_path}/a.db")
    assert isinstance(sql, SqlAnchor)
    sql.close()
    with pytest.raises(ConfigurationError):
        anchor_from_uri("file://elsewhere/a.jsonl")
    with pytest.raises(ConfigurationError):
        anchor_from_uri("nosuchdialect://x")


# -- several writers ----------------------------------------------------------------------


def _writer(db_url: str, anchor_uri: str, count: int, barrier) -> None:
    charter = test_app.build(
        Charter(
            database_url=db_url, audit_keys=AUDIT_KEYS, audit_anchor=anchor_uri,
            checkpoint_interval=None,
        )
    )  # fmt: skip
    try:
        alice = member()
        doc = create_doc(charter, alice)
        barrier.wait()
        for i in range(count):
            charter.execute(alice, "doc.rename", {"title": f"t{i}"}, target=doc)
            assert charter.checkpoint_now() is not None
    finally:
        charter.close()


def member() -> Actor:
    return Actor.make("alice", "acme", roles={"member"})


@pytest.mark.slow
def test_two_processes_checkpointing_at_once_leave_one_valid_chain(database_url, anchor_uri):
    """Each writer re-reads the anchor's end under its lock (file) or retries a taken
    position (database), and the checkpoint chain retries a taken position too."""
    ctx = multiprocessing.get_context("spawn")
    count, barrier = 15, ctx.Barrier(2)
    procs = [
        ctx.Process(target=_writer, args=(database_url, anchor_uri, count, barrier))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [0, 0] == [p.exitcode for p in procs]
    anchor = anchor_from_uri(anchor_uri)
    verifier = Charter(database_url=database_url, audit_keys=AUDIT_KEYS, audit_anchor=anchor)
    try:
        reading = read_anchor(anchor, KEYRING)
        # the genesis, then one checkpoint per rename, from both processes
        assert ([], list(range(1, 2 * count + 2))) == (
            reading.problems,
            [r.position for r in reading.records],
        )
        report = verifier.verify_audit()
        assert (True, 2 * count, 2 * (count + 1)) == (
            report.ok,
            report.checkpoints,
            report.entries,
        )
    finally:
        verifier.close()


# -- the schedule ---------------------------------------------------------------------------


def observe_runs(charter: Charter, monkeypatch) -> threading.Event:
    """An event set after each checkpoint the schedule's thread writes."""
    ran = threading.Event()
    original = charter.checkpointer.checkpoint_now

    def observed():
        row = original()
        ran.set()
        return row

    monkeypatch.setattr(charter.checkpointer, "checkpoint_now", observed)
    return ran


def checkpoints(charter: Charter) -> list[dict]:
    with charter.session() as s:
        return [dict(r._mapping) for r in s.execute(select(checkpoint_table))]


def test_the_gate_checkpoints_every_n_entries_by_itself(database_url, anchor_uri, monkeypatch):
    charter = test_app.build(
        Charter(database_url=database_url, audit_keys=AUDIT_KEYS, audit_anchor=anchor_uri,
                checkpoint_interval=None, checkpoint_entries=3)
    )  # fmt: skip
    try:
        ran = observe_runs(charter, monkeypatch)
        alice = member()
        doc = create_doc(charter, alice)
        charter.execute(alice, "doc.rename", {"title": "a"}, target=doc)
        assert [] == checkpoints(charter)  # two entries: not yet
        charter.execute(alice, "doc.rename", {"title": "b"}, target=doc)
        assert ran.wait(10)
        (row,) = checkpoints(charter)
        assert [3] == [seq for seq, _ in row["heads"].values()]
        assert 2 == read_anchor(charter.anchor, KEYRING).count  # genesis + the checkpoint
        assert 1 == len(checkpoint_threads())
    finally:
        charter.close()
    assert [] == checkpoint_threads()


def test_the_gate_checkpoints_every_interval_by_itself(database_url, monkeypatch):
    charter = test_app.build(
        Charter(database_url=database_url, audit_keys=AUDIT_KEYS,
                checkpoint_interval=timedelta(milliseconds=50))
    )  # fmt: skip
    try:
        ran = observe_runs(charter, monkeypatch)
        assert [] == checkpoint_threads()  # lazily: nothing written yet, no thread
        create_doc(charter, member())
        assert ran.wait(10)
        assert 1 <= len(checkpoints(charter))
        assert charter.verify_audit().ok
    finally:
        charter.close()


JOB = """
import sys, threading
sys.path.insert(0, {root!r})
from charter import Actor, Charter
from tests import app as test_app

charter = test_app.build(Charter(database_url={url!r}, audit_keys={keys!r},
                                 audit_anchor={anchor!r}, checkpoint_entries=5))
ran = threading.Event()
original = charter.checkpointer.checkpoint_now
def observed():
    row = original()
    ran.set()
    return row
charter.checkpointer.checkpoint_now = observed
alice = Actor.make("alice", "acme", roles={{"member"}})
doc = charter.execute(alice, "doc.create", {{"title": "t"}}).resource_id
for i in range(4):
    charter.execute(alice, "doc.rename", {{"title": str(i)}}, target=doc)
print("after 5 entries:", ran.wait(10))
for i in range(7):
    charter.execute(alice, "doc.rename", {{"title": str(i)}}, target=doc)
# No close(): leaving the interpreter writes the last checkpoint.
"""


@pytest.mark.slow
def test_a_plain_library_process_checkpoints_by_itself_and_when_it_exits(database_url, tmp_path):
    """No reference service, no maintenance loop: a script that uses the gate."""
    anchor = tmp_path / "audit.anchor.jsonl"
    script = tmp_path / "job.py"
    root = str(Path(__file__).resolve().parents[1])
    script.write_text(JOB.format(root=root, url=database_url, keys=AUDIT_KEYS, anchor=str(anchor)))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert (0, "after 5 entries: True\n") == (done.returncode, done.stdout), done.stderr
    records = read_anchor(FileAnchor(anchor), KEYRING).records
    tops = [max(seq for seq, _ in r.heads.values()) for r in records[1:]]
    assert (5, 12) == (tops[0], tops[-1])  # the 5th entry's checkpoint ... the one at exit
    charter = Charter(database_url=database_url, audit_keys=AUDIT_KEYS, audit_anchor=str(anchor))
    try:
        assert charter.verify_audit().ok
        with charter.engine.begin() as conn:
            conn.execute(audit_table.delete().where(audit_table.c.seq == 12))
        assert [("deleted", 12)] == [(p.kind, p.seq) for p in charter.verify_audit().problems]
    finally:
        charter.close()


def test_a_scheduled_checkpoint_reads_nothing_from_the_trail(database_url, monkeypatch):
    """After its first (full) checkpoint, a process signs its streams' heads from memory."""
    charter = test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    try:
        alice = member()
        doc = create_doc(charter, alice)
        charter.checkpoint_now()  # the first: every stream, read from the table
        charter.execute(alice, "doc.rename", {"title": "x"}, target=doc)
        statements: list[str] = []
        event.listen(
            charter.engine, "before_cursor_execute", lambda c, cur, s, *a: statements.append(s)
        )
        row = charter.checkpoint_now()
        assert row is not None
        assert [2] == [seq for seq, _ in row["heads"].values()]
        assert [] == [s for s in statements if re.search(r"\bcharter_audit\b", s)]
        assert None is charter.checkpoint_now()  # nothing moved since: nothing written
    finally:
        charter.close()


def test_close_writes_a_last_checkpoint_and_stops_the_thread(database_url):
    charter = test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    create_doc(charter, member())
    assert 1 == len(checkpoint_threads())
    charter.close()
    assert [] == checkpoint_threads()
    again = Charter(database_url=database_url, audit_keys=AUDIT_KEYS)
    try:
        assert 1 == len(checkpoints(again))
    finally:
        again.close()


def test_disposing_the_engine_stops_the_thread_and_the_next_entry_restarts_it(database_url):
    charter = test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    try:
        alice = member()
        doc = create_doc(charter, alice)
        charter.engine.dispose()
        assert [] == checkpoint_threads()
        charter.execute(alice, "doc.rename", {"title": "x"}, target=doc)
        assert 1 == len(checkpoint_threads())
    finally:
        charter.close()
    assert [] == checkpoint_threads()


def test_a_charter_dropped_without_close_stops_its_thread(database_url):
    import gc

    charter = test_app.build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    create_doc(charter, member())
    engine = charter.engine
    assert 1 == len(checkpoint_threads())
    del charter
    gc.collect()
    try:
        assert [] == checkpoint_threads()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_checkpoint_does_not_wait_for_an_open_gate_transaction(pg_schema):
    """PostgreSQL: a gate transaction holds its row lock while the checkpoint runs."""
    charter = test_app.build(Charter(database_url=pg_schema, audit_keys=AUDIT_KEYS))
    inside, release = threading.Event(), threading.Event()

    @charter.action("doc.slow", on=test_app.Doc, input=test_app.Rename, allow=test_app.is_member)
    def slow(ctx, doc, data):
        doc.title = data.title
        inside.set()
        assert release.wait(30)
        return {"title": doc.title}

    try:
        alice = member()
        doc = create_doc(charter, alice)
        charter.execute(alice, "doc.rename", {"title": "a"}, target=doc)
        worker = threading.Thread(
            target=charter.execute, args=(alice, "doc.slow", {"title": "b"}), kwargs={"target": doc}
        )
        worker.start()
        assert inside.wait(30)
        with ThreadPoolExecutor(1) as pool:
            # The full checkpoint (it reads every head and writes the chain) finishes
            # while the gate transaction is still open, holding its row lock.
            row = pool.submit(charter.checkpoint_audit).result(timeout=10)
        release.set()
        worker.join(30)
        stream = charter.history("test_docs", doc)[0]["stream"]
        assert 2 == row["heads"][stream][0]
    finally:
        release.set()
        charter.close()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with a thread (Python 3.12+)
def test_a_forked_worker_checkpoints_on_its_own_fresh_streams(database_url, tmp_path):
    anchor = str(tmp_path / "audit.anchor.jsonl")
    charter = test_app.build(
        Charter(database_url=database_url, audit_keys=AUDIT_KEYS, audit_anchor=anchor)
    )
    try:
        alice = member()
        doc = create_doc(charter, alice)  # the parent has a stream and a running thread
        charter.checkpoint_now()

        def child() -> None:
            try:
                charter.engine.dispose(close=False)  # what a pre-forking server's worker does
                charter.execute(alice, "doc.rename", {"title": "child"}, target=doc)
                row = charter.checkpoint_now()
                code = 0 if row is not None and charter.checkpointer.running else 3
            except Exception:
                code = 4
            os._exit(code)

        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(60)
        assert 0 == proc.exitcode
        charter.execute(alice, "doc.rename", {"title": "parent"}, target=doc)
        charter.checkpoint_now()
        with charter.session() as s:
            streams = s.execute(select(audit_table.c.stream).distinct()).scalars().all()
        report = charter.verify_audit()
        assert (True, 2) == (report.ok, len(streams)), report.problems
    finally:
        charter.close()


# -- settings --------------------------------------------------------------------------------


def test_the_anchor_defaults_to_a_file_beside_a_development_sqlite_database_only():
    dev = Settings.for_audit({"CHARTER_ENV": "development",
                              "CHARTER_DATABASE_URL": "sqlite:///var/app.db"})  # fmt: skip
    assert "var/app.db.anchor.jsonl" == dev.audit_anchor_uri
    memory = Settings.for_audit({"CHARTER_ENV": "development", "CHARTER_DATABASE_URL": "sqlite://"})
    assert None is memory.audit_anchor_uri
    prod = {"CHARTER_ENV": "production", "CHARTER_AUDIT_KEY": "k:0123456789abcdef0123"}
    assert None is Settings.for_audit(prod).audit_anchor_uri
    chosen = Settings.for_audit({**prod, "CHARTER_AUDIT_ANCHOR": "file:///srv/a.jsonl"})
    assert "file:///srv/a.jsonl" == chosen.audit_anchor_uri
    off = Settings.for_audit({"CHARTER_ENV": "development", "CHARTER_AUDIT_ANCHOR": "none"})
    assert None is off.audit_anchor_uri


def test_without_an_anchor_outside_development_the_gate_warns(database_url, caplog):
    with caplog.at_level("WARNING", logger="charter"):
        Charter(database_url=database_url, audit_keys=AUDIT_KEYS).close()
    assert "nothing outside the database vouches for the audit trail" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="charter"):
        Charter(database_url=database_url, development=True).close()
    assert "" == caplog.text


def test_the_sql_anchor_lives_in_its_own_table(tmp_path):
    anchor = SqlAnchor(f"sqlite:///{tmp_path / 'anchor.db'}")
    try:
        filled(anchor, 2)
        with anchor.engine.connect() as conn:
            assert [1, 2, 3] == conn.execute(
                text("SELECT position FROM charter_audit_anchor ORDER BY position")
            ).scalars().all()
    finally:
        anchor.close()


def test_write_checkpoint_signs_the_heads_it_is_given(database_url):
    charter = Charter(database_url=database_url, audit_keys=AUDIT_KEYS)
    try:
        clock = FrozenClock()
        row = write_checkpoint(charter.engine, KEYRING, clock(), heads={"s": [3, "h" * 64]})
        assert (1, {"s": [3, "h" * 64]}) == (row["position"], row["heads"])
    finally:
        charter.close()
