"""Ways around tenant isolation inside a handler that an attack run found, each now closed.

* An ORM bulk ``update()``/``delete()`` of a joined-table-inheritance subclass of a
  declared resource: the tenant criterion named the parent table with no join
  condition (``UPDATE contracts … FROM docs WHERE docs.tenant_id = 'acme'``), so
  another tenant's row was written. Other tables an ORM bulk UPDATE reads (its
  values or ``WHERE`` name them) were not confined either.
* A subquery over another tenant's record used as a written *value*: an ORM bulk
  ``insert()``, or a record's attribute flushed by the unit of work, copied
  another tenant's data into the actor's records.
* An instance that names the actor's tenant but carries another tenant's primary
  key (``session.merge(obj, load=False)``, ``make_transient_to_detached`` then
  ``add``): the flush updated or deleted the other tenant's row by primary key,
  and its expired attributes loaded that row.

Each is now confined (nothing of another tenant found) or a 403 with rule
``tenant``, audited, and nothing commits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, delete, func, insert, select, update
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    make_transient_to_detached,
    mapped_column,
    relationship,
)

from charter import Actor, Charter, Forbidden
from charter.audit import audit_table
from charter.storage import make_engine

from .conftest import AUDIT_KEYS

ALICE = Actor.make("alice", "acme", roles={"member"})


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "tenancy_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    balance: Mapped[int] = mapped_column(default=0)
    version: Mapped[int] = mapped_column(default=1)
    entries: Mapped[list[Entry]] = relationship()


class Entry(Base):
    __tablename__ = "tenancy_entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[int | None] = mapped_column(ForeignKey("tenancy_accounts.id"))
    amount: Mapped[int | None] = mapped_column(default=0)
    version: Mapped[int] = mapped_column(default=1)


class Doc(Base):
    __tablename__ = "tenancy_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    counter: Mapped[int] = mapped_column(default=0)
    version: Mapped[int] = mapped_column(default=1)
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "doc"}


class Contract(Doc):
    """Joined-table inheritance: the tenant is in the parent's table."""

    __tablename__ = "tenancy_contracts"
    id: Mapped[int] = mapped_column(ForeignKey("tenancy_docs.id"), primary_key=True)
    value: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "contract"}


#: acme: account 1 (entries 1, 2), contract 1; globex: account 2 (entry 3), contract 2.
MINE, FOREIGN = 1, 2
_NAMES = itertools.count()


@pytest.fixture
def charter(database_url: str) -> Iterator[Charter]:
    engine = make_engine(database_url)
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(
                insert(Account),
                [
                    {"id": 1, "tenant_id": "acme", "name": "acme-main", "balance": 100},
                    {"id": 2, "tenant_id": "globex", "name": "globex-main", "balance": 1000},
                ],
            )
            connection.execute(
                insert(Entry),
                [
                    {"id": 1, "tenant_id": "acme", "account_id": 1, "amount": 10},
                    {"id": 2, "tenant_id": "acme", "account_id": 1, "amount": 20},
                    {"id": 3, "tenant_id": "globex", "account_id": 2, "amount": 30},
                ],
            )
            connection.execute(
                insert(Doc.__table__),
                [
                    {"id": 1, "tenant_id": "acme", "kind": "contract", "counter": 0, "version": 1},
                    {
                        "id": 2,
                        "tenant_id": "globex",
                        "kind": "contract",
                        "counter": 0,
                        "version": 1,
                    },
                ],
            )
            connection.execute(
                insert(Contract.__table__), [{"id": 1, "value": 10}, {"id": 2, "value": 999}]
            )
    finally:
        engine.dispose()
    instance = Charter(database_url=database_url, audit_keys=AUDIT_KEYS)
    for model in (Account, Entry, Doc):
        instance.resource(model, tenant="tenant_id", version="version")
    yield instance
    instance.close()


def rows(charter: Charter) -> dict[str, list[tuple[Any, ...]]]:
    with Session(charter.engine) as session:
        return {
            "accounts": session.execute(
                select(Account.id, Account.tenant_id, Account.name, Account.balance)
                .order_by(Account.id)
            ).all(),
            "entries": session.execute(
                select(Entry.id, Entry.tenant_id, Entry.account_id, Entry.amount).order_by(Entry.id)
            ).all(),
            "docs": session.execute(
                select(Doc.__table__.c.id, Doc.__table__.c.counter).order_by(Doc.__table__.c.id)
            ).all(),
            "contracts": session.execute(
                select(Contract.__table__.c.id, Contract.__table__.c.value)
                .order_by(Contract.__table__.c.id)
            ).all(),
        }  # fmt: skip


def run(charter: Charter, on: type[Any], handler: Callable[[Session, Any], Any]) -> Any:
    """Run ``handler(session, target)`` in a plain action on the actor's record 1: its body."""
    name = f"{on.__tablename__}.attack{next(_NAMES)}"
    charter.action(name, on=on, allow=True)(lambda ctx, record, _: handler(ctx.session, record))
    return charter.execute(ALICE, name, target=MINE).body


def refused(charter: Charter, on: type[Any], handler: Callable[[Session, Any], Any]) -> None:
    """``handler`` is a 403 with rule ``tenant``, audited, and nothing it wrote commits."""
    before = rows(charter)
    with pytest.raises(Forbidden) as info:
        run(charter, on, handler)
    assert "tenant" == info.value.decision.rule
    assert before == rows(charter)
    with charter.engine.connect() as connection:
        outcome = connection.execute(
            select(audit_table.c.outcome, audit_table.c.rule).order_by(audit_table.c.id.desc())
        ).first()
    assert ("forbidden", "tenant") == tuple(outcome or ())


def postgres(charter: Charter) -> bool:
    return charter.engine.dialect.name == "postgresql"


# -- 1. ORM bulk UPDATE/DELETE of a joined-inheritance subclass, and other tables it reads ------


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(
            lambda: update(Contract).where(Contract.id == FOREIGN).values(value=0), id="update"
        ),
        pytest.param(lambda: delete(Contract).where(Contract.id == FOREIGN), id="delete"),
        pytest.param(
            lambda: update(Contract).where(Contract.id == MINE).values(value=0), id="own record"
        ),
    ],
)
def test_a_bulk_write_of_a_joined_inheritance_subclass_by_criteria_is_refused(charter, write):
    """Its tenant is in the parent's table, which the criteria named with no join condition:
    another tenant's contract was written (deleted on PostgreSQL)."""
    refused(charter, Doc, lambda session, _: session.execute(write()))


def test_a_joined_inheritance_subclass_is_updated_by_primary_key_in_the_tenant_only(charter):
    refused(charter, Doc, lambda s, _: s.execute(update(Contract), [{"id": FOREIGN, "value": 0}]))
    run(charter, Doc, lambda s, _: s.execute(update(Contract), [{"id": MINE, "value": 11}]))
    assert [(1, 11), (2, 999)] == rows(charter)["contracts"]


@pytest.mark.filterwarnings("ignore:.*cartesian product:sqlalchemy.exc.SAWarning")
def test_another_table_a_bulk_update_reads_is_confined_to_the_tenant(charter):
    """``UPDATE … SET amount = accounts.balance FROM accounts``: SQLAlchemy confines the
    entity written, not the table its values read (and warns of the statement's cartesian
    product, which is the handler's)."""

    def copy(session: Session, _: Any) -> dict[str, Any]:
        session.execute(delete(Entry).where(Entry.account_id == MINE))
        session.execute(delete(Account).where(Account.id == MINE))  # globex's is the only one
        session.add(Entry(id=4, amount=0))
        session.flush()
        session.execute(update(Entry).where(Entry.id == 4).values(amount=Account.balance))
        return {"amount": session.scalar(select(Entry.amount).where(Entry.id == 4))}

    assert {"amount": 0} == run(charter, Doc, copy)


# -- 2. another tenant's data copied by an ORM write's values ----------------------------------


def globex_balance() -> Any:
    return select(Account.balance).where(Account.id == FOREIGN).scalar_subquery()


def test_a_subquery_in_an_orm_bulk_insert_reads_the_actors_tenant_only(charter):
    def copy(session: Session, account: Account) -> None:
        session.execute(
            insert(Entry).values(
                id=4, tenant_id="acme", account_id=account.id, amount=globex_balance()
            )
        )
        session.execute(
            update(Entry).where(Entry.id == 2).values(amount=globex_balance())
        )  # confined already: SQLAlchemy applies the criteria to an UPDATE's subqueries

    run(charter, Account, copy)
    entries = rows(charter)["entries"]
    assert (2, "acme", 1, None) == entries[1]
    assert [(4, "acme", 1, None)] == [e for e in entries if e[0] > 3]


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(
            lambda s, account: s.add(Entry(account_id=account.id, amount=globex_balance())),
            id="a new record",
        ),
        pytest.param(
            lambda s, account: setattr(s.get(Entry, 1), "amount", globex_balance()),
            id="a loaded record",
        ),
        pytest.param(
            lambda s, account: setattr(
                account, "name", select(Account.name).where(Account.id == 2).scalar_subquery()
            ),
            id="the target",
        ),
        pytest.param(
            lambda s, account: setattr(account, "balance", Entry.amount),
            id="another table's column",
        ),
        pytest.param(
            lambda s, account: setattr(
                account, "balance", select(Entry.amount).where(Entry.id == 3).scalar_subquery()
            ),
            id="a subquery of the record's own table",
        ),
    ],
)
def test_a_flushed_value_that_reads_records_is_refused(charter, write):
    def flushed(session: Session, account: Account) -> None:
        write(session, account)
        session.flush()  # the unit of work (the target alone may be written without it)

    refused(charter, Account, flushed)


def test_a_flushed_expression_over_the_records_own_row_goes_through(charter):
    def bump(session: Session, account: Account) -> None:
        entry = session.get(Entry, 1)
        assert entry is not None
        entry.amount = Entry.amount + 1
        session.add(Entry(id=4, amount=func.coalesce(None, 7)))
        doc = session.get(Doc, MINE)
        assert doc is not None
        doc.counter = Doc.counter + 5

    run(charter, Account, bump)
    assert [11, 7] == [e[3] for e in rows(charter)["entries"] if e[0] in (1, 4)]
    assert (1, 5) == rows(charter)["docs"][0]


# -- 3. a forged instance: the actor's tenant in memory, another tenant's primary key ----------


def forged(model: type[Any], **values: Any) -> Any:
    record = model(**values)
    make_transient_to_detached(record)  # as if loaded: persistent once added, no SQL
    return record


def merge_and_change(id: int) -> Callable[[Session, Any], None]:
    def write(session: Session, _: Any) -> None:
        cached = forged(Account, id=id, tenant_id="acme", name="cached", balance=5, version=1)
        merged = session.merge(cached, load=False)
        merged.name, merged.balance = "changed", 0

    return write


def add_and_delete(session: Session, _: Any) -> None:
    record = forged(Entry, id=3, tenant_id="acme", amount=0, version=1)
    session.add(record)
    session.delete(record)


def add_and_read(session: Session, _: Any) -> dict[str, Any]:
    record = forged(Account, id=FOREIGN, tenant_id="acme")  # every other attribute expired
    session.add(record)
    return {"balance": record.balance}


def adopt_through_a_collection(session: Session, account: Account) -> None:
    record = forged(Entry, id=3, tenant_id="acme", amount=30, version=1)
    session.add(record)
    account.entries.append(record)  # the flush writes its account_id by itself


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(merge_and_change(FOREIGN), id="merged with load=False, then changed"),
        pytest.param(add_and_delete, id="made detached, added, deleted"),
        pytest.param(add_and_read, id="an expired attribute loaded"),
        pytest.param(adopt_through_a_collection, id="written by a relationship"),
    ],
)
def test_a_forged_instance_of_another_tenants_row_is_refused(charter, write):
    refused(charter, Account, write)


def test_a_forged_instance_of_the_actors_own_row_goes_through(charter):
    run(charter, Account, merge_and_change(MINE))
    assert (1, "acme", "changed", 0) == rows(charter)["accounts"][0]
