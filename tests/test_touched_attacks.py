"""Every record whose row a call's flush changed is bumped and audited, however it changed.

Found by attack: a record changed only through a relationship (SQLAlchemy writes the
foreign key while it flushes: a collection append, remove or clear, a parent's delete, a
delete-orphan) was neither version-bumped nor named in the call's entry; a delete the
handler flushed itself was named without ``deleted: true``.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import ForeignKey, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from charter import A, Actor, Charter
from charter.context import ActionContext

from .conftest import AUDIT_KEYS


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "touch_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(32), default="")
    version: Mapped[int] = mapped_column(default=1)
    entries: Mapped[list[Entry]] = relationship(back_populates="account")
    # The same foreign key seen from the account only (no backref), as many models have.
    plain_entries: Mapped[list[Entry]] = relationship(overlaps="entries,account")
    notes: Mapped[list[Note]] = relationship(cascade="all, delete-orphan")


class Entry(Base):
    __tablename__ = "touch_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[int | None] = mapped_column(ForeignKey("touch_accounts.id"))
    state: Mapped[str] = mapped_column(String(16), default="open")
    version: Mapped[int] = mapped_column(default=1)
    account: Mapped[Account | None] = relationship(back_populates="entries")
    shelf_id: Mapped[int | None] = mapped_column(ForeignKey("touch_shelves.id"))


class Shelf(Base):
    """Not a declared resource: a new one takes declared entries along."""

    __tablename__ = "touch_shelves"

    id: Mapped[int] = mapped_column(primary_key=True)
    entries: Mapped[list[Entry]] = relationship()


class Note(Base):
    __tablename__ = "touch_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[int] = mapped_column(ForeignKey("touch_accounts.id"))
    version: Mapped[int] = mapped_column(default=1)


class Other(BaseModel):
    model_config = ConfigDict(extra="forbid")
    other: int


MEMBER = A.has_role("member")
ALICE = Actor.make("alice", "acme", roles={"member"})


def build(url: str) -> Charter:
    charter = Charter(database_url=url, audit_keys=AUDIT_KEYS)
    charter.resource(Account, tenant="tenant_id", version="version")
    charter.resource(Entry, tenant="tenant_id", state="state", version="version")
    charter.resource(Note, tenant="tenant_id", version="version")

    @charter.action("account.adopt", on=Account, input=Other, allow=MEMBER)
    def adopt(ctx: ActionContext, account: Account, data: Other) -> None:
        assert ctx.session is not None
        account.plain_entries.append(ctx.session.get(Entry, data.other))

    @charter.action("account.adopt_flushed", on=Account, input=Other, allow=MEMBER)
    def adopt_flushed(ctx: ActionContext, account: Account, data: Other) -> None:
        assert ctx.session is not None
        account.plain_entries.append(ctx.session.get(Entry, data.other))
        ctx.session.flush()

    @charter.action("account.drop_entries", on=Account, allow=MEMBER)
    def drop_entries(ctx: ActionContext, account: Account, _: Any) -> None:
        account.plain_entries.clear()

    @charter.action("account.close", on=Account, input=Other, allow=MEMBER)
    def close(ctx: ActionContext, account: Account, data: Other) -> None:
        assert ctx.session is not None
        ctx.session.delete(ctx.session.get(Account, data.other))

    @charter.action("account.drop_note", on=Account, input=Other, allow=MEMBER)
    def drop_note(ctx: ActionContext, account: Account, data: Other) -> None:
        account.notes[:] = [n for n in account.notes if n.id != data.other]

    @charter.action("account.shelve", on=Account, input=Other, allow=MEMBER)
    def shelve(ctx: ActionContext, account: Account, data: Other) -> None:
        assert ctx.session is not None
        ctx.session.add(Shelf(entries=[ctx.session.get(Entry, data.other)]))

    @charter.action("account.delete_entry", on=Account, input=Other, allow=MEMBER)
    def delete_entry(ctx: ActionContext, account: Account, data: Other) -> None:
        assert ctx.session is not None
        ctx.session.delete(ctx.session.get(Entry, data.other))

    @charter.action("account.delete_entry_flushed", on=Account, input=Other, allow=MEMBER)
    def delete_entry_flushed(ctx: ActionContext, account: Account, data: Other) -> None:
        assert ctx.session is not None
        ctx.session.delete(ctx.session.get(Entry, data.other))
        ctx.session.flush()

    Base.metadata.drop_all(charter.engine)  # PostgreSQL keeps tables between runs
    Base.metadata.create_all(charter.engine)
    return charter


@pytest.fixture
def ledger(database_url: str) -> Any:
    charter = build(database_url)
    with charter.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO touch_accounts (id, tenant_id, name, version) "
                "VALUES (1, 'acme', 'a1', 1), (2, 'acme', 'a2', 1), (3, 'acme', 'a3', 1)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO touch_entries (id, tenant_id, account_id, state, version) VALUES "
                "(1, 'acme', 1, 'open', 1), (2, 'acme', 1, 'open', 1), "
                "(3, 'acme', 2, 'open', 1), (4, 'acme', 3, 'open', 1)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO touch_notes (id, tenant_id, account_id, version) "
                "VALUES (1, 'acme', 1, 1), (2, 'acme', 1, 1)"
            )
        )
    yield charter
    charter.engine.dispose()


def rows(charter: Charter, sql: str) -> list[tuple[Any, ...]]:
    with charter.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql))]


def entries(charter: Charter) -> list[tuple[Any, ...]]:
    return rows(charter, "SELECT id, account_id, version FROM touch_entries ORDER BY id")


def last_touched(charter: Charter, type_: str, id_: int, action: str) -> list[dict[str, Any]]:
    """The entry of ``action`` that the history of ``type_``/``id_`` finds: its touched list."""
    found = [e for e in charter.history(type_, id_) if e["action"] == action]
    assert found, f"history({type_!r}, {id_}) has no {action} entry"
    touched: list[dict[str, Any]] = found[-1]["detail"]["touched"]
    return touched


MOVED = {"type": "touch_entries", "before": "open", "after": "open"}


# -- defect 4: records changed through relationships -------------------------------------


def test_an_entry_moved_by_a_collection_append_is_bumped_and_audited(ledger):
    ledger.execute(ALICE, "account.adopt", {"other": 3}, target=1)
    assert (3, 1, 2) == entries(ledger)[2]  # moved to account 1, version bumped
    assert [{**MOVED, "id": "3"}] == last_touched(ledger, "touch_entries", 3, "account.adopt")
    assert ledger.verify_audit().ok


def test_an_entry_moved_by_an_append_the_handler_flushed_is_bumped_and_audited(ledger):
    ledger.execute(ALICE, "account.adopt_flushed", {"other": 3}, target=1)
    assert (3, 1, 2) == entries(ledger)[2]
    touched = last_touched(ledger, "touch_entries", 3, "account.adopt_flushed")
    assert [{**MOVED, "id": "3"}] == touched


def test_entries_released_by_a_collection_clear_are_bumped_and_audited(ledger):
    ledger.execute(ALICE, "account.drop_entries", target=1)
    assert [(1, None, 2), (2, None, 2)] == entries(ledger)[:2]
    expected = [{**MOVED, "id": "1"}, {**MOVED, "id": "2"}]
    for id_ in (1, 2):  # in the order the flush wrote them
        touched = last_touched(ledger, "touch_entries", id_, "account.drop_entries")
        assert expected == sorted(touched, key=lambda t: t["id"])
    assert ledger.verify_audit().ok


def test_a_child_whose_parent_is_deleted_is_bumped_and_audited(ledger):
    ledger.execute(ALICE, "account.close", {"other": 3}, target=1)
    assert (4, None, 2) == entries(ledger)[3]  # its foreign key nulled by the flush
    assert [
        {"type": "touch_accounts", "id": "3", "deleted": True},
        {**MOVED, "id": "4"},
    ] == last_touched(ledger, "touch_entries", 4, "account.close")
    assert [] == rows(ledger, "SELECT id FROM touch_accounts WHERE id = 3")


def test_an_orphan_deleted_by_the_flush_is_audited_as_deleted(ledger):
    ledger.execute(ALICE, "account.drop_note", {"other": 2}, target=1)
    assert [(1,)] == rows(ledger, "SELECT id FROM touch_notes ORDER BY id")
    assert [{"type": "touch_notes", "id": "2", "deleted": True}] == last_touched(
        ledger, "touch_notes", 2, "account.drop_note"
    )


def test_an_entry_taken_along_by_a_new_undeclared_parent_is_bumped_and_audited(ledger):
    ledger.execute(ALICE, "account.shelve", {"other": 3}, target=1)
    assert [(3, 1, 2)] == rows(
        ledger, "SELECT id, shelf_id, version FROM touch_entries WHERE id = 3"
    )
    assert [{**MOVED, "id": "3"}] == last_touched(ledger, "touch_entries", 3, "account.shelve")


# -- defect 7: a delete the handler flushed -----------------------------------------------


@pytest.mark.parametrize("action", ["account.delete_entry", "account.delete_entry_flushed"])
def test_a_deleted_entry_is_audited_as_deleted_whether_or_not_the_handler_flushed(ledger, action):
    ledger.execute(ALICE, action, {"other": 2}, target=1)
    assert [] == rows(ledger, "SELECT id FROM touch_entries WHERE id = 2")
    assert [
        {"type": "touch_entries", "id": "2", "before": "open", "after": None, "deleted": True}
    ] == last_touched(ledger, "touch_entries", 2, action)
    assert ledger.verify_audit().ok
