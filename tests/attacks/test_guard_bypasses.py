"""Ways around the tenant and workflow guards that an attack run found, each now refused.

A reviewer who had only the README wrote handlers that write a record's tenant
or workflow state by paths the flush guards did not look at. Each of these
committed before the fix:

* a subclass of a declared model (single-table inheritance): both guards looked
  resources up by the record's exact class;
* a relationship whose foreign key *is* the state or tenant column
  (``order.status = <approved>``): SQLAlchemy copies the key into the column
  during the flush, after ``before_flush`` looked;
* a flow's step log appended to in place by a transition's handler: the gate
  compared the log with the very list it had planned, and ``requires=`` trusts it;
* a bound parameter in ``.values()`` whose value the execution's parameters
  (or a ``callable_``) replace: the bulk guards read its default.

Each is now a 403 (rule ``tenant`` or ``workflow``), audited, with nothing written.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import JSON, DateTime, ForeignKey, String, bindparam, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from charter import Actor, Charter, Forbidden, Transition
from charter.audit import audit_table
from charter.storage import make_engine

from ..conftest import AUDIT_KEYS

ALICE = Actor.make("alice", "acme", roles={"member"})


class Base(DeclarativeBase):
    pass


class Doc(Base):
    __tablename__ = "guard_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(24))
    version: Mapped[int] = mapped_column(default=1)
    note: Mapped[str | None] = mapped_column(String(200), default=None)
    kind: Mapped[str] = mapped_column(String(10), default="plain")
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "plain"}


class Contract(Doc):
    """A kind of document: the same table, tenant and workflow (single-table inheritance)."""

    __mapper_args__ = {"polymorphic_identity": "contract"}


class Status(Base):
    __tablename__ = "guard_status"
    name: Mapped[str] = mapped_column(String(24), primary_key=True)


class Tenant(Base):
    __tablename__ = "guard_tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)


class Order(Base):
    """The state and the tenant are foreign keys, each with a relationship."""

    __tablename__ = "guard_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("guard_tenants.id"))
    state: Mapped[str] = mapped_column(ForeignKey("guard_status.name"))
    version: Mapped[int] = mapped_column(default=1)
    status: Mapped[Status] = relationship()
    tenant: Mapped[Tenant] = relationship()


class Ticket(Base):
    """A multi-request flow: a deadline per step and the gate's step log."""

    __tablename__ = "guard_tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(24))
    version: Mapped[int] = mapped_column(default=1)
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    steps: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)


STATES = ("new", "approved", "closed")
_NAMES = itertools.count()


@pytest.fixture
def charter(database_url: str) -> Iterator[Charter]:
    engine = make_engine(database_url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(insert(Status), [{"name": s} for s in STATES])
            connection.execute(insert(Tenant), [{"id": "acme"}, {"id": "globex"}])
            connection.execute(
                insert(Doc),
                [
                    {"id": 101, "tenant_id": "acme", "state": "new", "kind": "plain"},
                    {"id": 102, "tenant_id": "acme", "state": "new", "kind": "contract"},
                    {"id": 103, "tenant_id": "globex", "state": "new", "kind": "contract"},
                ],
            )
            connection.execute(insert(Order).values(id=101, tenant_id="acme", state="new"))
    finally:
        engine.dispose()
    instance = Charter(database_url=database_url, audit_keys=AUDIT_KEYS)
    for model in (Doc, Order):
        instance.resource(model, tenant="tenant_id", state="state", version="version")
        instance.workflow(
            model, states=STATES, initial="new",
            transitions=(Transition(f"{model.__tablename__}.approve", "new", "approved"),),
        )  # fmt: skip
        instance.action(f"{model.__tablename__}.approve", on=model, allow=True)(
            lambda ctx, record, data: None
        )
    yield instance
    instance.close()


def refused(charter: Charter, on: type[Any], target: int, write: Callable[..., Any]) -> str:
    """Run ``write(session, record)`` as a handler of a plain (non-transition) action: the
    rule of its 403, after checking that nothing changed and that the refusal is audited."""
    name = f"{on.__tablename__}.attack{next(_NAMES)}"
    charter.action(name, on=on, allow=True)(lambda ctx, record, _: write(ctx.session, record))
    before = rows(charter)
    with pytest.raises(Forbidden) as info:
        charter.execute(ALICE, name, target=target)
    assert before == rows(charter)
    with charter.engine.connect() as connection:
        outcome = connection.scalar(
            select(audit_table.c.outcome).where(audit_table.c.action == name)
        )
    assert "forbidden" == outcome
    return str(info.value.decision.rule)


def rows(charter: Charter) -> list[tuple[Any, ...]]:
    with Session(charter.engine) as session:
        docs = session.execute(select(Doc.id, Doc.tenant_id, Doc.state, Doc.note, Doc.kind))
        orders = session.execute(select(Order.id, Order.tenant_id, Order.state))
        return sorted(map(tuple, docs)) + sorted(map(tuple, orders))


# -- single-table inheritance -------------------------------------------------------------


@pytest.mark.parametrize(
    ("write", "rule"),
    [
        (lambda s, _: setattr(s.get(Doc, 102), "state", "approved"), "workflow"),
        (lambda s, _: s.add(Contract(tenant_id="acme", state="approved")), "workflow"),
        (
            lambda s, _: s.execute(
                update(Contract).where(Contract.id == 102).values(state="closed")
            ),
            "workflow",
        ),
        (
            lambda s, _: s.execute(insert(Contract), [{"tenant_id": "acme", "state": "approved"}]),
            "workflow",
        ),
        (lambda s, _: setattr(s.get(Doc, 102), "tenant_id", "globex"), "tenant"),
        (lambda s, _: s.add(Contract(tenant_id="globex", state="new")), "tenant"),
    ],
    ids=["set state", "create approved", "bulk update", "bulk insert", "move", "create elsewhere"],
)
def test_a_subclass_of_a_declared_model_is_under_its_guards(charter, write, rule):
    assert rule == refused(charter, Doc, 101, write)


def test_a_subclass_record_is_read_and_acted_on_as_its_resource(charter):
    with Session(charter.engine) as session:
        contract = session.get(Doc, 102)
        assert isinstance(contract, Contract)
        assert charter.allowed_actions(ALICE, contract)["guard_docs.approve"].allowed
    moved = charter.execute(ALICE, "guard_docs.approve", target=102)
    assert "102" == moved.resource_id
    charter.action("guard_docs.peek", on=Doc, allow=True)(
        lambda ctx, _r, _d: [d.id for d in ctx.session.scalars(select(Contract))]
    )
    assert [102] == charter.execute(ALICE, "guard_docs.peek", target=101).body  # not 103


# -- a relationship whose foreign key is the state or the tenant ------------------------------


@pytest.mark.parametrize(
    ("write", "rule"),
    [
        (lambda s, order: setattr(order, "status", s.get(Status, "approved")), "workflow"),
        (lambda s, _: s.add(Order(tenant_id="acme", status=s.get(Status, "approved"))), "workflow"),
        (lambda s, order: setattr(order, "tenant", s.get(Tenant, "globex")), "tenant"),
        (lambda s, _: s.add(Order(tenant=s.get(Tenant, "globex"), state="new")), "tenant"),
    ],
    ids=["state by relationship", "created approved", "moved", "created elsewhere"],
)
def test_a_foreign_key_set_through_a_relationship_is_checked_as_written(charter, write, rule):
    assert rule == refused(charter, Order, 101, write)


def test_the_same_relationship_with_the_allowed_values_is_written(charter):
    @charter.action("guard_orders.reopen_as_new", on=Order, allow=True)
    def same_values(ctx: Any, order: Order, _: Any) -> None:
        order.status = ctx.session.get(Status, "new")  # the state it has: no change
        ctx.session.add(Order(tenant=ctx.session.get(Tenant, "acme"), state="new"))

    charter.execute(ALICE, "guard_orders.reopen_as_new", target=101)
    assert [("acme", "new"), ("acme", "new")] == [r[1:] for r in rows(charter)[-2:]]


# -- a flow's step log, appended to in place --------------------------------------------------


def test_a_handler_cannot_forge_a_step_by_appending_to_the_log_in_place(database_url):
    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    charter = Charter(database_url=database_url, audit_keys=AUDIT_KEYS)
    try:
        charter.resource(Ticket, tenant="tenant_id", state="state", version="version")
        charter.workflow(
            Ticket, states=("new", "verified", "paid", "done"), initial="new",
            transitions=(
                Transition("ticket.verify", "new", "verified"),
                Transition("ticket.pay", "verified", "paid"),
                Transition("ticket.complete", ("verified", "paid"), "done",
                           requires=("ticket.verify", "ticket.pay")),
            ),
            deadline="deadline", log="steps",
            expires={s: timedelta(minutes=15) for s in ("new", "verified", "paid")},
        )  # fmt: skip

        @charter.action("ticket.create", on=Ticket, creates=True, allow=True)
        def create(ctx: Any, _: None, _d: Any) -> Ticket:
            ticket = Ticket(state="new")
            ctx.session.add(ticket)
            return ticket

        @charter.action("ticket.verify", on=Ticket, allow=True)
        def verify(ctx: Any, ticket: Ticket, _: Any) -> None:
            assert ticket.steps is not None
            ticket.steps.append({"action": "ticket.pay", "at": ctx.now.isoformat()})  # forged

        charter.action("ticket.complete", on=Ticket, allow=True)(lambda c, t, d: None)
        ticket = int(charter.execute(ALICE, "ticket.create").resource_id or 0)
        with pytest.raises(Forbidden) as info:
            charter.execute(ALICE, "ticket.verify", target=ticket)
        assert "workflow" == info.value.decision.rule
        with Session(charter.engine) as session:
            stored = session.get(Ticket, ticket)
            assert stored is not None
            assert ("new", None) == (stored.state, stored.steps)
    finally:
        charter.close()


# -- bound parameters whose value the execution decides --------------------------------------


def test_a_bound_parameter_is_checked_with_the_value_the_execution_sends(charter):
    forms = [
        lambda s, _: s.execute(
            insert(Doc).values(tenant_id=bindparam("t", value="acme"), state="new"),
            {"t": "globex"},
        ),
        lambda s, _: s.execute(
            insert(Doc).values(tenant_id="acme", state=bindparam("st", value="new")),
            {"st": "approved"},
        ),
        lambda s, _: s.execute(
            update(Doc).where(Doc.id == 101).values(state=bindparam("st", value="new")),
            {"st": "closed"},
        ),
        lambda s, _: s.execute(  # a callable: what it returns to the guard need not be sent
            insert(Doc).values(
                tenant_id="acme", state=bindparam("st", value="new", callable_=lambda: "new")
            )
        ),
        lambda s, _: s.add(Doc(tenant_id="acme", state=bindparam("s", value="new"))),
    ]
    assert ["tenant", "workflow", "workflow", "workflow", "workflow"] == [
        refused(charter, Doc, 101, form) for form in forms
    ]


def test_a_bound_parameter_with_allowed_values_is_written(charter):
    @charter.action("guard_docs.annotate", on=Doc, allow=True)
    def annotate(ctx: Any, _doc: Doc, _: Any) -> None:
        ctx.session.execute(
            insert(Doc).values(id=9, tenant_id=bindparam("t"), state=bindparam("st")),
            {"t": "acme", "st": "new"},
        )

    charter.execute(ALICE, "guard_docs.annotate", target=101)
    assert (9, "acme", "new", None, "plain") in rows(charter)
