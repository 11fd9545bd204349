"""A list's page: the records it returns, what it sends, and what a failure leaves (SQLite and
PostgreSQL).

A plain mapper's page is read in Core and made into instances directly; any other mapper is
loaded by the ORM. Either way the caller gets what the ORM gives after loading the rows and
closing its session: detached instances, loaded columns, no history.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Numeric, String, event, insert, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, deferred, mapped_column
from sqlalchemy.orm.exc import DetachedInstanceError

from charter import A, Actor, Charter
from charter.audit import audit_table
from charter.context import ActionContext

from ..conftest import AUDIT_KEYS


class Base(DeclarativeBase):
    pass


class Note(Base):
    """A plain mapper: every column loaded, no events."""

    __tablename__ = "test_page_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    # An attribute named differently from its column: rows are read by column key.
    title: Mapped[str] = mapped_column("heading", String(64))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))


class Memo(Base):
    """Not plain: a deferred column, which the ORM leaves unloaded."""

    __tablename__ = "test_page_memos"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = deferred(mapped_column(String(200)))


ALICE = Actor.make("alice", "acme", roles={"member"}, scopes={"notes:list"})


def noop(ctx: ActionContext, record: Any, data: Any) -> None:
    return None


@pytest.fixture
def pages(database_url: str, disposing: Any) -> Charter:
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    Base.metadata.drop_all(charter.engine)
    Base.metadata.create_all(charter.engine)
    for model in (Note, Memo):
        charter.resource(model, tenant="tenant_id")
    member = A.has_role("member")
    charter.action("note.list", on=Note, allow=member, listable=True, scope="notes:list")(noop)
    charter.action("memo.list", on=Memo, allow=member, listable=True, scope="notes:list")(noop)
    with charter.engine.begin() as conn:
        conn.execute(
            insert(Note.__table__),
            [
                {"id": i, "tenant_id": "acme" if i % 3 else "globex", "heading": f"n{i}",
                 "amount": Decimal(i) / 4}
                for i in range(1, 31)
            ],
        )  # fmt: skip
        conn.execute(
            insert(Memo.__table__),
            [{"id": i, "tenant_id": "acme", "title": f"m{i}", "body": "secret"} for i in (1, 2)],
        )
    return charter


def orm_page(charter: Charter, model: type[Any], ids: list[int]) -> list[Any]:
    """What the ORM gives for the same rows: loaded, then its session closed."""
    with Session(charter.engine, expire_on_commit=False) as session:
        return list(session.scalars(select(model).where(model.id.in_(ids)).order_by(model.id)))


def test_a_plain_mappers_page_is_what_the_orm_loads_detached(pages):
    page = pages.list_records(ALICE, "note.list", limit=5)
    ids = [note.id for note in page.records]
    assert [1, 2, 4, 5, 7] == ids  # acme's only, in id order
    for ours, theirs in zip(page.records, orm_page(pages, Note, ids), strict=True):
        state, expected = sa_inspect(ours), sa_inspect(theirs)
        assert (True, False, None) == (state.detached, state.modified, state.session)
        assert expected.key == state.key
        assert {k: v for k, v in vars(theirs).items() if not k.startswith("_sa")} == {
            k: v for k, v in vars(ours).items() if not k.startswith("_sa")
        }
        assert not state.unloaded  # every column loaded, as the ORM does
        assert type(ours.amount) is Decimal


def test_a_page_record_can_be_merged_into_a_session_without_sql(pages):
    """Detached with its identity: merge(load=False) makes it persistent and changes flush."""
    record = pages.list_records(ALICE, "note.list", limit=1).records[0]
    with Session(pages.engine) as session:
        merged = session.merge(record, load=False)
        merged.title = "renamed"
        session.commit()
    with pages.engine.connect() as conn:
        assert "renamed" == conn.scalar(select(Note.__table__.c.heading).where(Note.id == 1))


def test_a_mapper_that_is_not_plain_is_loaded_by_the_orm(pages):
    page = pages.list_records(ALICE, "memo.list", limit=10)
    assert ["m1", "m2"] == [memo.title for memo in page.records]
    state = sa_inspect(page.records[0])
    assert state.detached
    assert "body" in state.unloaded  # deferred, as the ORM leaves it
    with pytest.raises(DetachedInstanceError):
        _ = page.records[0].body


def test_a_page_is_read_then_audited_with_no_transaction_around_the_read(pages):
    """PostgreSQL: two autocommit round trips (the SELECT, the entry's INSERT), no BEGIN or
    COMMIT. SQLite: the read without the write lock, then a short write transaction."""
    sent: list[str] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement.split()[0].upper())

    def on_commit(conn: Any) -> None:
        sent.append("COMMIT")

    event.listen(pages.engine, "before_cursor_execute", on_execute)
    event.listen(pages.engine, "commit", on_commit)
    try:
        pages.list_records(ALICE, "note.list", limit=5)
    finally:
        event.remove(pages.engine, "before_cursor_execute", on_execute)
        event.remove(pages.engine, "commit", on_commit)
    if pages.runtime.postgres:
        assert ["SELECT", "INSERT"] == sent
    else:  # a deferred BEGIN for the read (no write lock), then BEGIN IMMEDIATE for the entry
        assert ["BEGIN", "SELECT", "BEGIN", "INSERT", "COMMIT"] == sent


def test_a_page_whose_audit_entry_cannot_be_written_is_not_returned(pages):
    """No entry written, no page returned; the audit stream stays whole."""

    def refuse(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO CHARTER_AUDIT"):
            raise ConnectionError("the audit table is unavailable")

    with pages.engine.connect() as conn:
        before = conn.scalar(select(audit_table.c.id).order_by(audit_table.c.id.desc()))
    event.listen(pages.engine, "before_cursor_execute", refuse)
    try:
        with pytest.raises(ConnectionError):
            pages.list_records(ALICE, "note.list", limit=5)
    finally:
        event.remove(pages.engine, "before_cursor_execute", refuse)
    page = pages.list_records(ALICE, "note.list", limit=5)  # the stream is usable again
    assert 5 == len(page)
    with pages.engine.connect() as conn:
        entries = conn.execute(
            select(audit_table.c.action).where(audit_table.c.id > (before or 0))
        ).all()
    assert [("note.list",)] == entries
    assert pages.verify_audit().ok
