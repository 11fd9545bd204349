"""The gate as a pipeline: its stages, its statements, and every record a call touches."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    Numeric,
    String,
    UniqueConstraint,
    delete,
    event,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import A, Actor, Charter, ConfigurationError, Conflict, Forbidden, NotFound, R
from charter.audit import audit_table
from charter.context import ActionContext

from . import app as test_app
from .conftest import AUDIT_KEYS
from .test_gate import create_doc


class Base(DeclarativeBase):
    pass


class Card(Base):
    __tablename__ = "test_cards"
    __table_args__ = (UniqueConstraint("tenant_id", "code"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    code: Mapped[str] = mapped_column(String(32))
    label: Mapped[str] = mapped_column(String(32), default="")
    state: Mapped[str] = mapped_column(String(16), default="active")
    balance: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    version: Mapped[int] = mapped_column(default=1)


class Transfer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: int
    amount: Decimal = Field(gt=0, max_digits=12, decimal_places=2)


class Reach(BaseModel):
    model_config = ConfigDict(extra="forbid")
    other: int


class Redeem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(max_length=32)


MEMBER = A.has_role("member")


def build(url: str, **options: Any) -> Charter:
    charter = Charter(database_url=url, audit_keys=AUDIT_KEYS, **options)
    test_app.build(charter)
    charter.resource(Card, tenant="tenant_id", state="state", version="version")

    @charter.action(
        "card.transfer", on=Card, input=Transfer, allow=MEMBER & (R.state == "active"),
        locks=lambda data: [(Card, data.to)], idempotency="optional",
    )  # fmt: skip
    def transfer(ctx: ActionContext, card: Card, data: Transfer) -> dict[str, Any]:
        (to,) = ctx.locked
        card.balance -= data.amount
        to.balance += data.amount
        return {"from": str(card.balance), "to": str(to.balance)}

    @charter.action("card.redeem", on=Card, input=Redeem, target="code", by="code", allow=MEMBER)
    def redeem(ctx: ActionContext, card: Card, data: Redeem) -> dict[str, Any]:
        card.state = "redeemed"
        return {"id": card.id}

    @charter.action("card.peek_other", on=Card, input=Reach, allow=MEMBER)
    def peek_other(ctx: ActionContext, card: Card, data: Reach) -> dict[str, Any]:
        assert ctx.session is not None
        other = ctx.session.get(Card, data.other)
        return {"found": other is not None}

    @charter.action("card.drain_other", on=Card, input=Reach, allow=MEMBER)
    def drain_other(ctx: ActionContext, card: Card, data: Reach) -> dict[str, Any]:
        assert ctx.session is not None
        result = ctx.session.execute(update(Card).where(Card.id == data.other).values(balance=0))
        return {"rows": result.rowcount}  # type: ignore[attr-defined]

    @charter.action("card.adopt_other", on=Card, input=Reach, allow=MEMBER)
    def adopt_other(ctx: ActionContext, card: Card, data: Reach) -> dict[str, Any]:
        # A record of another tenant that reached the session from elsewhere.
        with charter.session() as outside:
            other = outside.get(Card, data.other)
        assert ctx.session is not None
        assert other is not None
        ctx.session.add(other)
        other.balance = Decimal(0)
        return {}

    @charter.action("card.delete_other", on=Card, input=Reach, allow=MEMBER)
    def delete_other(ctx: ActionContext, card: Card, data: Reach) -> dict[str, Any]:
        with charter.session() as outside:
            other = outside.get(Card, data.other)
        assert ctx.session is not None
        assert other is not None
        ctx.session.add(other)
        ctx.session.delete(other)
        return {}

    @charter.action("card.touch_later", on=Card, input=Reach, allow=MEMBER)
    def touch_later(ctx: ActionContext, card: Card, data: Reach) -> dict[str, Any]:
        other = ctx.lock(Card, data.other)
        assert other is not None
        other.label = "touched"
        card.label = "touched too"
        return {}

    Base.metadata.create_all(charter.engine)
    return charter


@pytest.fixture
def cards(database_url: str) -> Any:
    charter = build(database_url)
    yield charter
    charter.engine.dispose()


def add_card(charter: Charter, tenant: str, code: str, balance: str = "100") -> int:
    with charter.runtime.sessions() as session:
        card = Card(tenant_id=tenant, code=code, balance=Decimal(balance))
        session.add(card)
        session.commit()
        return card.id


def card(charter: Charter, id: int) -> Card:
    with charter.session() as session:
        found = session.get(Card, id)
        assert found is not None
        return found


ALICE = Actor.make("alice", "acme", roles={"member"})


# -- named stages, assembled once --------------------------------------------------------


def test_pipeline_of_lists_the_stages_each_kind_of_action_runs(cards):
    pg = cards.runtime.postgres
    names = {action: cards.pipeline_of(action).names for action in cards.actions}
    load_keyed = ("claim_and_load",) if pg else ("claim", "load")
    tail = ("decide", "precondition", "handler", "track", "seal", "commit")
    # Rate limits are on by default (in this process): the first stage of every action.
    # No key: no claim, no replay.
    assert ("rate_limit", "validate", "load", *tail) == names["doc.rename"]
    assert ("rate_limit", "validate", "replay", *load_keyed, *tail) == names["doc.charge"]
    # A creation has no target to load or compare (its key is optional, the default);
    # a sensitive read is not keyed.
    assert ("rate_limit", "validate", "replay", "claim", "decide", *tail[2:]) == names["doc.create"]
    assert ("rate_limit", "validate", "load", *tail) == names["doc.read"]
    # Declared locks: the claim cannot ride on a one-record load.
    assert ("rate_limit", "validate", "replay", "claim", "load", *tail) == names["card.transfer"]
    assert all(stage.summary for stage in cards.pipeline_of("card.transfer"))


def test_a_stage_plugs_in_by_name_and_runs_in_its_place(database_url, disposing):
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    seen: list[str] = []

    def stamp(assembly: Any) -> Any:
        from charter.pipeline import Stage

        def stamp(call: Any) -> None:
            """Note which record the decision will see."""
            seen.append(f"{call.spec.name}:{getattr(call.record, 'id', None)}")

        return Stage("stamp", stamp)

    charter.add_stage("stamp", stamp, before="decide")
    test_app.build(charter)
    assert "stamp" == charter.pipeline_of("doc.rename").names[3]
    doc_id = create_doc(charter, ALICE)
    charter.execute(ALICE, "doc.rename", {"title": "x"}, target=doc_id)
    assert ["doc.create:None", f"doc.rename:{doc_id}"] == seen
    with pytest.raises(ConfigurationError, match="before declaring actions"):
        charter.add_stage("late", stamp, after="decide")


# -- statements per call -------------------------------------------------------------------


def count_statements(charter: Charter, call: Any) -> int:
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(charter.engine, "before_cursor_execute", seen)
    try:
        call()
    finally:
        event.remove(charter.engine, "before_cursor_execute", seen)
    return len(statements)


def test_the_statements_of_a_plain_a_keyed_and_a_replayed_call_are_pinned(cards, disposing):
    doc_id = create_doc(cards, ALICE)
    plain = count_statements(
        cards, lambda: cards.execute(ALICE, "doc.rename", {"title": "x"}, target=doc_id)
    )
    keyed = count_statements(
        cards, lambda: cards.execute(ALICE, "doc.charge", {"amount": "1"}, target=doc_id, key="k")
    )
    replayed = count_statements(
        cards, lambda: cards.execute(ALICE, "doc.charge", {"amount": "1"}, target=doc_id, key="k")
    )
    cold = disposing(build(cards.engine.url.render_as_string(hide_password=False)))  # 2nd worker
    replayed_cold = count_statements(
        cold, lambda: cold.execute(ALICE, "doc.charge", {"amount": "1"}, target=doc_id, key="k")
    )
    if cards.runtime.postgres:
        # SELECT ... FOR UPDATE; UPDATE carrying the audit INSERT (and the outcome) as CTEs.
        # The claim rides on the SELECT. A warm replay: one autocommit INSERT; a cold one
        # learns from the claiming SELECT that the key is taken (no unique violation,
        # nothing locked), reads the stored outcome and writes its entry in the same
        # transaction, then commits.
        assert (2, 2, 1, 3) == (plain, keyed, replayed, replayed_cold)
    else:
        # BEGIN IMMEDIATE; SELECT; UPDATE; INSERT entry (+ claim INSERT and outcome INSERT).
        # A warm replay: BEGIN IMMEDIATE and the entry; a cold one first fails its claim
        # (BEGIN IMMEDIATE, INSERT), then reads the stored outcome (BEGIN, SELECT).
        assert (4, 6, 2, 6) == (plain, keyed, replayed, replayed_cold)


# -- every record a call touches ---------------------------------------------------------


# -- a refused call keeps the connection's prepared statements (PostgreSQL, psycopg) ----------


def _one_connection(url: str) -> Charter:
    """A Charter whose calls all take the same pooled connection, with a handler that counts
    the server-side prepared statements of the connection it runs on."""
    from charter.storage import make_engine

    charter = test_app.build(
        Charter(engine=make_engine(url, pool_size=1, max_overflow=0), audit_keys=AUDIT_KEYS)
    )

    @charter.action("doc.prepared", on=test_app.Doc, allow=test_app.is_member)
    def prepared(ctx: ActionContext, doc: Any, data: BaseModel) -> int:
        assert ctx.session is not None
        return int(
            ctx.session.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar_one()
        )

    return charter


@pytest.mark.postgres
def test_a_refused_call_keeps_the_connections_prepared_statements(pg_schema, disposing):
    """psycopg's rollback() drops every prepared statement of a connection; the gate's does not,
    so refusals do not make the next calls parse and plan their statements again."""
    from .conftest import _truncate_pg

    _truncate_pg(pg_schema)
    charter = _one_connection(pg_schema)
    try:
        doc = create_doc(charter, ALICE)
        for _ in range(8):  # psycopg prepares a statement at its 5th execution
            before = charter.execute(ALICE, "doc.prepared", target=doc).body
        assert before >= 2  # the claim-and-load and the UPDATE carrying the audit INSERT
        for _ in range(3):
            with pytest.raises(Forbidden):
                charter.execute(ALICE, "doc.publish", target=doc)  # editors only: refused
        after = charter.execute(ALICE, "doc.prepared", target=doc).body
        assert after >= before
    finally:
        charter.close()
        charter.engine.dispose()


@pytest.mark.postgres
def test_a_connection_lost_inside_a_call_is_a_503_and_the_next_call_gets_a_new_one(
    pg_schema,
):
    from charter.errors import StorageUnavailable

    from .conftest import _truncate_pg

    _truncate_pg(pg_schema)
    charter = _one_connection(pg_schema)

    @charter.action("doc.lose_connection", on=test_app.Doc, allow=test_app.is_member)
    def lose(ctx: ActionContext, doc: Any, data: BaseModel) -> None:
        assert ctx.session is not None
        ctx.session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    try:
        doc = create_doc(charter, ALICE)
        with pytest.raises(StorageUnavailable):
            charter.execute(ALICE, "doc.lose_connection", target=doc)
        assert charter.execute(ALICE, "doc.prepared", target=doc).body >= 0
    finally:
        charter.close()
        charter.engine.dispose()


def test_declared_locks_reach_the_handler_and_every_changed_record_is_bumped_and_audited(cards):
    a, b = add_card(cards, "acme", "A"), add_card(cards, "acme", "B")
    outcome = cards.execute(ALICE, "card.transfer", {"to": b, "amount": "30"}, target=a)
    assert {"from": "70.00", "to": "130.00"} == outcome.body
    assert (2, 2) == (card(cards, a).version, card(cards, b).version)
    entry = cards.history("test_cards", b)[-1]
    assert (str(a), "card.transfer") == (entry["resource_id"], entry["action"])
    assert [{"type": "test_cards", "id": str(b), "before": "active", "after": "active"}] == (
        entry["detail"]["touched"]
    )
    assert cards.verify_audit().ok


def test_a_declared_lock_of_another_tenant_is_not_found_and_nothing_moves(cards):
    a, foreign = add_card(cards, "acme", "A"), add_card(cards, "globex", "G")
    with pytest.raises(NotFound):
        cards.execute(ALICE, "card.transfer", {"to": foreign, "amount": "30"}, target=a)
    assert (Decimal("100"), Decimal("100")) == (
        card(cards, a).balance,
        card(cards, foreign).balance,
    )


def test_records_locked_inside_the_handler_are_bumped_and_audited_too(cards):
    a, b = add_card(cards, "acme", "A"), add_card(cards, "acme", "B")
    cards.execute(ALICE, "card.touch_later", {"other": b}, target=a)
    assert ("touched", 2) == (card(cards, b).label, card(cards, b).version)
    assert ["card.touch_later"] == [e["action"] for e in cards.history("test_cards", b)]


def test_records_changed_by_orm_bulk_updates_and_deletes_are_bumped_and_audited(cards):
    """An ORM bulk UPDATE (by criteria, by primary key) or DELETE in a handler: every record it
    changed gets its version bump and is named in the call's entry, which its history finds."""
    a, b, c, d = (add_card(cards, "acme", code) for code in "ABCD")
    foreign = add_card(cards, "globex", "G")

    @cards.action("card.sweep", on=Card, allow=MEMBER)
    def sweep(ctx: ActionContext, target: Card, _: Any) -> None:
        assert ctx.session is not None
        ctx.session.execute(
            update(Card).where(Card.code.in_(["B", "C", "G"])).values(state="frozen")
        )
        ctx.session.execute(update(Card), [{"id": b, "label": "by key"}])
        ctx.session.execute(delete(Card).where(Card.code == "D"))
        target.label = "swept"

    cards.execute(ALICE, "card.sweep", target=a)
    assert [2, 3, 2] == [card(cards, i).version for i in (a, b, c)]  # b: two statements
    assert ("frozen", "by key") == (card(cards, b).state, card(cards, b).label)
    assert (1, "active") == (card(cards, foreign).version, card(cards, foreign).state)
    entry = cards.history("test_cards", c)[-1]
    assert (str(a), "card.sweep") == (entry["resource_id"], entry["action"])
    assert [
        {"type": "test_cards", "id": str(b), "before": "active", "after": "frozen"},
        {"type": "test_cards", "id": str(c), "before": "active", "after": "frozen"},
        {"type": "test_cards", "id": str(d), "before": "active", "after": None, "deleted": True},
    ] == entry["detail"]["touched"]
    assert ["card.sweep"] == [e["action"] for e in cards.history("test_cards", d)]
    assert cards.verify_audit().ok


def test_a_bulk_change_of_many_records_goes_in_bounded_statements(cards, monkeypatch):
    """Ids go to the database in lists of at most CHUNK (SQLite binds at most 32,766 parameters;
    PostgreSQL gets one array): here 2, with five records updated by criteria then by key."""
    from charter.pipeline import dml

    monkeypatch.setattr(dml, "CHUNK", 2)
    ids = [add_card(cards, "acme", code) for code in "ABCDE"]

    @cards.action("card.relabel", on=None, allow=MEMBER)
    def relabel(ctx: ActionContext, _: None, __: Any) -> None:
        assert ctx.session is not None
        ctx.session.execute(update(Card).where(Card.code != "X").values(state="frozen"))
        ctx.session.execute(update(Card), [{"id": i, "label": f"L{i}"} for i in ids])

    cards.execute(ALICE, "card.relabel")
    assert [(3, "frozen", f"L{i}") for i in ids] == [
        (card(cards, i).version, card(cards, i).state, card(cards, i).label) for i in ids
    ]
    (entry,) = [e for e in cards.history("test_cards", ids[-1]) if e["action"] == "card.relabel"]
    assert [str(i) for i in ids] == [t["id"] for t in entry["detail"]["touched"]]


def test_a_bulk_update_is_narrowed_to_the_records_it_matched_and_listed(cards):
    """The statement changes exactly the records selected (and locked) before it ran: what the
    entry lists is what changed, even if another record starts matching meanwhile."""
    a = add_card(cards, "acme", "A")
    b = add_card(cards, "acme", "B")
    seen: list[str] = []

    @cards.action("card.freeze_b", on=Card, allow=MEMBER)
    def freeze_b(ctx: ActionContext, target: Card, _: Any) -> None:
        assert ctx.session is not None

        def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            seen.append(statement.split()[0].upper())

        event.listen(cards.engine, "before_cursor_execute", on_execute)
        try:
            ctx.session.execute(update(Card).where(Card.code == "B").values(state="frozen"))
        finally:
            event.remove(cards.engine, "before_cursor_execute", on_execute)

    cards.execute(ALICE, "card.freeze_b", target=a)
    # the matching ids (FOR UPDATE on PostgreSQL), the version bump, the update, the states after
    assert ["SELECT", "UPDATE", "UPDATE", "SELECT"] == seen
    assert ("frozen", 2) == (card(cards, b).state, card(cards, b).version)


def test_a_target_is_located_by_a_column_unique_within_the_tenant(cards):
    add_card(cards, "globex", "SUMMER")
    mine = add_card(cards, "acme", "SUMMER")
    assert {"id": mine} == cards.execute(ALICE, "card.redeem", {"code": "SUMMER"}).body
    with pytest.raises(NotFound):
        cards.execute(ALICE, "card.redeem", {"code": "WINTER"})


def test_locating_by_a_column_that_is_not_unique_is_refused_at_declaration(cards):
    with pytest.raises(ConfigurationError, match="must be unique within the tenant"):
        cards.action("card.by_label", on=Card, target="argument", by="label", allow=MEMBER)(
            lambda ctx, card, data: None
        )


@pytest.mark.parametrize("action", ["card.peek_other", "card.drain_other"])
def test_another_tenants_record_is_invisible_to_orm_reads_and_bulk_writes_in_a_handler(
    cards, action
):
    mine, foreign = add_card(cards, "acme", "A"), add_card(cards, "globex", "G")
    body = cards.execute(ALICE, action, {"other": foreign}, target=mine).body
    assert body in ({"found": False}, {"rows": 0})
    assert Decimal("100") == card(cards, foreign).balance


@pytest.mark.parametrize("action", ["card.adopt_other", "card.delete_other"])
def test_the_flush_guard_refuses_changing_or_deleting_another_tenants_record(cards, action):
    mine, foreign = add_card(cards, "acme", "A"), add_card(cards, "globex", "G")
    with pytest.raises(Forbidden) as refused:
        cards.execute(ALICE, action, {"other": foreign}, target=mine)
    assert "tenant" == refused.value.decision.rule
    assert Decimal("100") == card(cards, foreign).balance
    denial = cards.history("test_cards", mine)[-1]
    assert ("deny", "forbidden") == (denial["decision"], denial["outcome"])


def _dialect(session: Any) -> Any:
    """The dialect module whose ``insert`` has ON CONFLICT (PostgreSQL's or SQLite's)."""
    return postgresql if session.get_bind().dialect.name == "postgresql" else sqlite


#: Every way an ORM write in a handler could reach another tenant, each refused (rule tenant).
#: ``mine``/``foreign``: the ids of a card of the actor's tenant and of another's.
CROSS_TENANT_WRITES: dict[str, Any] = {
    "bulk insert of rows": lambda s, mine, foreign: s.execute(
        insert(Card), [{"tenant_id": "globex", "code": "X", "balance": Decimal(1)}]
    ),
    "insert .values()": lambda s, mine, foreign: s.execute(
        insert(Card).values(tenant_id="globex", code="X", balance=Decimal(1))
    ),
    "multi-values insert": lambda s, mine, foreign: s.execute(
        insert(Card).values(
            [
                {"tenant_id": "acme", "code": "X", "balance": Decimal(1)},
                {"tenant_id": "globex", "code": "Y", "balance": Decimal(1)},
            ]
        )
    ),
    "bulk insert naming no tenant": lambda s, mine, foreign: s.execute(
        insert(Card), [{"code": "X", "balance": Decimal(1)}]
    ),
    "insert from select": lambda s, mine, foreign: s.execute(
        insert(Card).from_select(
            ["tenant_id", "code", "balance"],
            select(literal("globex"), literal("X"), Card.balance).where(Card.id == mine),
        )
    ),
    "bulk update by primary key": lambda s, mine, foreign: s.execute(
        update(Card), [{"id": mine, "balance": Decimal(0)}, {"id": foreign, "balance": Decimal(0)}]
    ),
    "bulk update moving a record": lambda s, mine, foreign: s.execute(
        update(Card).where(Card.id == mine).values(tenant_id="globex")
    ),
    "upsert updating the row it conflicts with": lambda s, mine, foreign: s.execute(
        _dialect(s)
        .insert(Card)
        .values(id=foreign, tenant_id="acme", code="X", balance=Decimal(1))
        .on_conflict_do_update(index_elements=["id"], set_={"balance": Decimal(0)})
    ),
    "legacy bulk_update_mappings": lambda s, mine, foreign: s.bulk_update_mappings(
        Card, [{"id": foreign, "balance": Decimal(0)}]
    ),
    "legacy bulk_insert_mappings": lambda s, mine, foreign: s.bulk_insert_mappings(
        Card, [{"tenant_id": "globex", "code": "X", "balance": Decimal(1)}]
    ),
    "legacy bulk_save_objects": lambda s, mine, foreign: s.bulk_save_objects(
        [Card(tenant_id="acme", code="X", balance=Decimal(1))]
    ),
}


@pytest.mark.parametrize("write", list(CROSS_TENANT_WRITES))
def test_no_orm_bulk_write_in_a_handler_reaches_another_tenant(cards, write):
    """ORM bulk INSERT/UPDATE in every form SQLAlchemy takes, and its legacy bulk methods
    (which emit no ORM event): a 403 with rule tenant, audited, and nothing commits."""
    mine, foreign = add_card(cards, "acme", "A"), add_card(cards, "globex", "G")

    @cards.action("card.bulk_write", on=None, allow=MEMBER)
    def bulk_write(ctx: ActionContext, _: None, __: Any) -> None:
        assert ctx.session is not None
        ctx.session.execute(update(Card).where(Card.id == mine).values(label="first"))
        CROSS_TENANT_WRITES[write](ctx.session, mine, foreign)

    with pytest.raises(Forbidden) as refused:
        cards.execute(ALICE, "card.bulk_write")
    assert "tenant" == refused.value.decision.rule
    with cards.session() as session:
        rows = session.execute(select(Card.tenant_id, Card.code, Card.label, Card.balance)).all()
    assert [("acme", "A", "", Decimal(100)), ("globex", "G", "", Decimal(100))] == sorted(rows)
    a = audit_table.c
    with cards.engine.connect() as conn:
        denial = conn.execute(
            select(a.decision, a.outcome, a.rule).where(a.action == "card.bulk_write")
        ).all()
    assert [("deny", "forbidden", "tenant")] == denial


def test_orm_bulk_writes_within_the_actors_tenant_go_through(cards):
    first, second = add_card(cards, "acme", "A"), add_card(cards, "acme", "B")

    @cards.action("card.bulk_own", on=None, allow=MEMBER)
    def bulk_own(ctx: ActionContext, _: None, __: Any) -> None:
        assert ctx.session is not None
        ctx.session.execute(
            update(Card), [{"id": first, "label": "one"}, {"id": second, "label": "two"}]
        )
        ctx.session.execute(
            insert(Card), [{"tenant_id": "acme", "code": "C", "balance": Decimal(5)}]
        )
        ctx.session.execute(  # an insert that updates nothing on conflict is fine
            _dialect(ctx.session)
            .insert(Card)
            .values(id=first, tenant_id="acme", code="Z", balance=Decimal(9))
            .on_conflict_do_nothing()
        )

    cards.execute(ALICE, "card.bulk_own")
    with cards.session() as session:
        rows = session.execute(select(Card.code, Card.label).order_by(Card.code)).all()
    assert [("A", "one"), ("B", "two"), ("C", "")] == rows


# -- under concurrency (PostgreSQL) ----------------------------------------------------------


def deadlocks(charter: Charter) -> int:
    with charter.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            ).scalar_one()
        )


@pytest.mark.postgres
def test_forty_concurrent_opposite_transfers_neither_deadlock_nor_fail(pg_schema, disposing):
    from .conftest import _truncate_pg

    _truncate_pg(pg_schema)
    charter = disposing(build(pg_schema))
    a, b = add_card(charter, "acme", "A", "1000"), add_card(charter, "acme", "B", "1000")
    before = deadlocks(charter)
    start = threading.Barrier(8)

    def transfer(i: int) -> int:
        if i < 8:
            start.wait()
        source, to = (a, b) if i % 2 else (b, a)
        outcome = charter.execute(ALICE, "card.transfer", {"to": to, "amount": "1"}, target=source)
        return outcome.status

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(transfer, range(40)))
    assert [200] * 40 == statuses
    assert before == deadlocks(charter)
    assert Decimal("2000") == card(charter, a).balance + card(charter, b).balance
    assert (41, 41) == (card(charter, a).version, card(charter, b).version)  # both, every time


class PayByCode(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(max_length=32)
    to: int
    amount: Decimal


@pytest.mark.postgres
def test_a_target_found_by_another_column_is_locked_in_primary_key_order(pg_schema, disposing):
    """Opposite transfers, one locating its source by code (``by="code"``), the other by id:
    both lock (table, primary key) order, so no deadlock even without retries; a code that
    matches no record of the tenant is a 404, and the records stay as they were."""
    from .conftest import _truncate_pg

    _truncate_pg(pg_schema)
    charter = disposing(build(pg_schema, conflict_retries=0))

    @charter.action(
        "card.pay_by_code", on=Card, input=PayByCode, target="code", by="code",
        allow=MEMBER, locks=lambda data: [(Card, data.to)],
    )  # fmt: skip
    def pay_by_code(ctx: ActionContext, card: Card, data: PayByCode) -> dict[str, Any]:
        (to,) = ctx.locked
        card.balance -= data.amount
        to.balance += data.amount
        return {}

    a, b = add_card(charter, "acme", "A", "1000"), add_card(charter, "acme", "B", "1000")
    before = deadlocks(charter)
    start = threading.Barrier(8)

    def pay(i: int) -> int:
        if i < 8:
            start.wait()
        if i % 2:  # b -> a, b located by its code
            args = {"code": "B", "to": a, "amount": "1"}
            return charter.execute(ALICE, "card.pay_by_code", args).status
        args = {"to": b, "amount": "1"}  # a -> b, by id
        return charter.execute(ALICE, "card.transfer", args, target=a).status

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(pay, range(40)))
    assert [200] * 40 == statuses
    assert before == deadlocks(charter)
    assert (Decimal("1000"), Decimal("1000")) == (
        card(charter, a).balance,
        card(charter, b).balance,
    )
    with pytest.raises(NotFound):
        charter.execute(ALICE, "card.pay_by_code", {"code": "NONE", "to": a, "amount": "1"})
    add_card(charter, "globex", "G")
    with pytest.raises(NotFound):  # another tenant's code: not found either
        charter.execute(ALICE, "card.pay_by_code", {"code": "G", "to": a, "amount": "1"})


@pytest.mark.postgres
@pytest.mark.parametrize(("retries", "statuses"), [(3, [200, 200]), (0, [200, 409])])
def test_a_deadlock_is_retried_inside_the_gate_then_answered_409(
    pg_schema, retries, statuses, disposing
):
    from .conftest import _truncate_pg

    _truncate_pg(pg_schema)
    charter = disposing(build(pg_schema, conflict_retries=retries))
    a, b = add_card(charter, "acme", "A"), add_card(charter, "acme", "B")
    both_locked = threading.Barrier(2, timeout=10)
    first_attempt = {a: True, b: True}

    @charter.action("card.cross", on=Card, input=Reach, allow=MEMBER)
    def cross(ctx: ActionContext, mine: Card, data: Reach) -> dict[str, Any]:
        if first_attempt[mine.id]:  # lock in opposite orders, once: a real deadlock
            first_attempt[mine.id] = False
            both_locked.wait()
        ctx.lock(Card, data.other)
        mine.label = "crossed"
        return {}

    def run(source: int, other: int) -> Any:
        try:
            return charter.execute(ALICE, "card.cross", {"other": other}, target=source).status
        except Conflict as exc:
            return (exc.status, exc.code, exc.headers.get("Retry-After"))

    with ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(run, (a, b), (b, a)), key=str)
    expected = [200, 200] if retries else [(409, "conflict", "1"), 200]
    assert sorted(expected, key=str) == results
    assert statuses == sorted(r if isinstance(r, int) else r[0] for r in results)


def test_every_allowed_call_is_audited_with_its_touched_records_counted(cards):
    a, b = add_card(cards, "acme", "A"), add_card(cards, "acme", "B")
    cards.execute(ALICE, "card.transfer", {"to": b, "amount": "1"}, target=a)
    with cards.engine.connect() as conn:
        assert 1 == conn.execute(select(func.count()).select_from(audit_table)).scalar_one()


def test_verify_reports_a_deleted_or_forged_link_between_a_touched_record_and_its_entry(cards):
    from charter.audit import link_table

    a, b = add_card(cards, "acme", "A"), add_card(cards, "acme", "B")
    cards.execute(ALICE, "card.transfer", {"to": b, "amount": "1"}, target=a)
    with cards.engine.begin() as conn:
        (link,) = conn.execute(select(link_table)).all()
        conn.execute(link_table.delete())
        conn.execute(link_table.insert(), {**link._mapping, "resource_id": str(a)})
    problems = [(p.kind, p.detail) for p in cards.verify_audit().problems]
    assert [
        ("link", f"the link from test_cards {b} to this entry is missing"),
        ("link", f"a link from test_cards {a} names an entry that does not list it"),
    ] == problems
