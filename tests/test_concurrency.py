"""Concurrent actions on PostgreSQL: every effect has exactly one entry and the trail verifies."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from charter import Actor, Charter
from charter.audit import audit_table

from . import app as test_app
from .app import Doc
from .conftest import AUDIT_KEYS
from .test_gate import create_doc

pytestmark = pytest.mark.postgres

THREADS = 8
PER_WORKER = 10


@pytest.fixture
def pg_charter(pg_schema: str) -> Charter:
    from .conftest import _truncate_pg

    _truncate_pg(pg_schema)
    instance = test_app.build(Charter(database_url=pg_schema, audit_keys=AUDIT_KEYS))
    yield instance
    instance.engine.dispose()


def count_entries(charter: Charter, action: str) -> int:
    with charter.session() as s:
        return s.execute(
            select(func.count()).select_from(audit_table).where(audit_table.c.action == action)
        ).scalar_one()


def test_threads_bumping_one_record_serialize_on_its_row_lock(pg_charter, alice):
    doc_id = create_doc(pg_charter, alice)
    barrier = threading.Barrier(THREADS)

    def work() -> None:
        barrier.wait()
        for _ in range(PER_WORKER):
            pg_charter.execute(alice, "doc.bump", target=doc_id)

    with ThreadPoolExecutor(THREADS) as pool:
        for f in [pool.submit(work) for _ in range(THREADS)]:
            f.result()
    with pg_charter.session() as s:
        assert THREADS * PER_WORKER == s.get(Doc, doc_id).counter
    assert THREADS * PER_WORKER == count_entries(pg_charter, "doc.bump")
    report = pg_charter.verify_audit()
    assert report.ok, report.problems
    assert report.streams <= THREADS


def test_threads_on_distinct_records_each_leave_one_entry(pg_charter, alice):
    ids = [create_doc(pg_charter, alice, f"d{i}") for i in range(THREADS)]
    barrier = threading.Barrier(THREADS)

    def work(doc_id: int) -> None:
        barrier.wait()
        for _ in range(PER_WORKER):
            pg_charter.execute(alice, "doc.bump", target=doc_id)

    with ThreadPoolExecutor(THREADS) as pool:
        for f in [pool.submit(work, i) for i in ids]:
            f.result()
    assert THREADS * PER_WORKER == count_entries(pg_charter, "doc.bump")
    assert pg_charter.verify_audit().ok


def _process_worker(
    url: str, doc_id: int, count: int, barrier: multiprocessing.synchronize.Barrier
) -> None:
    charter = test_app.build(Charter(database_url=url, audit_keys=AUDIT_KEYS))
    actor = Actor.make("alice", "acme", roles={"member"})
    barrier.wait()
    for _ in range(count):
        charter.execute(actor, "doc.bump", target=doc_id)
    charter.engine.dispose()


def test_processes_bumping_one_record_leave_exactly_n_entries(pg_charter, alice, pg_schema):
    doc_id = create_doc(pg_charter, alice)
    workers = 4
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [
        ctx.Process(target=_process_worker, args=(pg_schema, doc_id, PER_WORKER, barrier))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [0] * workers == [p.exitcode for p in procs]
    with pg_charter.session() as s:
        assert workers * PER_WORKER == s.get(Doc, doc_id).counter
    assert workers * PER_WORKER == count_entries(pg_charter, "doc.bump")
    report = pg_charter.verify_audit()
    assert report.ok, report.problems
    assert report.streams >= workers
