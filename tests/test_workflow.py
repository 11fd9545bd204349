"""Workflows: a transition is checked on the locked state, and only the gate writes the state."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import JSON, DateTime, String, func, insert, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from charter import (
    A,
    Charter,
    ConfigurationError,
    DecisionKind,
    DomainError,
    Forbidden,
    InvalidTransition,
    NotFound,
    R,
    StepExpired,
    Transition,
)
from charter.audit.entry import audit_table
from charter.testing import make_actor
from charter.workflow import diagram

from .conftest import AUDIT_KEYS
from .test_pipeline import count_statements

ALICE = make_actor("alice", "acme", "member")
BOB = make_actor("bob", "acme", "approver")
GINA = make_actor("gina", "globex", "member")


class Base(DeclarativeBase):
    pass


class Ticket(Base):
    __tablename__ = "test_wf_tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(24))
    version: Mapped[int] = mapped_column(default=1)
    note: Mapped[str | None] = mapped_column(String(200), default=None)
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    steps: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)


FLOW = (
    Transition("ticket.open", "new", "open"),
    Transition("ticket.approve", "open", "approved", guard=R.note.is_not_none()),
    Transition("ticket.close", ("new", "open"), "closed"),
)


class Note(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = None


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def declare(charter: Charter, *, workflow: bool = True, **options: Any) -> Charter:
    """Tickets: new → open → approved, or closed from new or open (a member opens, an
    approver approves, the owner closes)."""
    charter.resource(Ticket, tenant="tenant_id", state="state", version="version")
    if workflow:
        charter.workflow(
            Ticket, states=("new", "open", "approved", "closed"), initial="new",
            transitions=options.pop("transitions", FLOW), **options,
        )  # fmt: skip
    charter.action("ticket.get", on=Ticket, allow=True, sensitive_read=True)(lambda c, t, d: {})

    @charter.action("ticket.create", on=Ticket, creates=True, input=Note, allow=True)
    def create(ctx: Any, _: None, data: Note) -> Ticket:
        ticket = Ticket(owner=ctx.actor.id, note=data.note, state="new")
        ctx.session.add(ticket)
        return ticket

    @charter.action("ticket.open", on=Ticket, allow=A.has_role("member") & (R.state == "new"))
    def open_(ctx: Any, ticket: Ticket, _: Any) -> dict[str, str]:
        return {"seen": ticket.state}  # the handler sees the new state

    charter.action("ticket.approve", on=Ticket, allow=A.has_role("approver"))(
        lambda ctx, t, d: {"state": t.state}
    )
    charter.action("ticket.close", on=Ticket, allow=R.owner == A.id)(lambda c, t, d: {})
    return charter


@pytest.fixture
def tickets(database_url: str, disposing: Callable[[Any], Any]) -> Charter:
    charter = disposing(declare(Charter(database_url=database_url, audit_keys=AUDIT_KEYS)))
    Base.metadata.create_all(charter.engine)
    return charter


def new_ticket(charter: Charter, note: str | None = "n", actor: Any = ALICE) -> int:
    return int(charter.execute(actor, "ticket.create", {"note": note}).resource_id)


def state(charter: Charter, ticket: int) -> str:
    with charter.session() as session:
        found = session.get(Ticket, ticket)
        assert found is not None
        return found.state


# -- the transition ---------------------------------------------------------------------


def test_a_transition_moves_the_record_and_the_handler_sees_the_new_state(tickets):
    ticket = new_ticket(tickets)
    assert {"seen": "open"} == tickets.execute(ALICE, "ticket.open", target=ticket).body
    assert "open" == state(tickets, ticket)
    entry = tickets.history("test_wf_tickets", ticket)[-1]
    assert ("new", "open", "ok") == (entry["state_before"], entry["state_after"], entry["outcome"])


def test_a_step_out_of_order_is_409_naming_the_state_and_the_next_actions(tickets):
    ticket = new_ticket(tickets)
    with pytest.raises(InvalidTransition) as info:
        tickets.execute(BOB, "ticket.approve", target=ticket)
    error = info.value
    assert (409, "invalid_transition") == (error.status, error.code)
    assert {"state": "new", "allowed": ["ticket.open", "ticket.close"]} == error.attrs
    assert "is new" in error.message
    assert "ticket.open, ticket.close" in error.message
    entry = tickets.history("test_wf_tickets", ticket)[-1]
    assert ("deny", "workflow", "invalid_transition") == (
        entry["decision"], entry["rule"], entry["outcome"],
    )  # fmt: skip


def test_the_state_is_checked_before_the_policy_even_when_a_rule_mentions_it(tickets):
    ticket = new_ticket(tickets)
    tickets.execute(ALICE, "ticket.open", target=ticket)
    # ticket.open's rule says R.state == "new" too, and bob is no member: still 409, not 403.
    with pytest.raises(InvalidTransition):
        tickets.execute(BOB, "ticket.open", target=ticket)
    with pytest.raises(Forbidden):  # possible, but not for him: the policy's 403
        tickets.execute(BOB, "ticket.close", target=ticket)


def test_load_comes_first_a_missing_or_foreign_record_is_404(tickets):
    ticket = new_ticket(tickets)
    tickets.execute(ALICE, "ticket.close", target=ticket)
    with pytest.raises(NotFound):
        tickets.execute(ALICE, "ticket.open", target=99999)
    with pytest.raises(NotFound):  # another tenant's closed ticket: not found, not 409
        tickets.execute(GINA, "ticket.open", target=ticket)


def test_an_unreadable_records_state_is_not_told(database_url, disposing):
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    charter.resource(Ticket, tenant="tenant_id", state="state", version="version")
    charter.workflow(Ticket, states=("new", "open", "approved", "closed"), initial="new",
                     transitions=FLOW)  # fmt: skip
    charter.action("ticket.get", on=Ticket, allow=R.owner == A.id, sensitive_read=True)(
        lambda c, t, d: {}
    )
    charter.action("ticket.create", on=Ticket, creates=True, input=Note, allow=True)(
        lambda ctx, _, d: ctx.session.add(Ticket(owner=ctx.actor.id, state="new")) or None
    )
    charter.action("ticket.approve", on=Ticket, allow=True)(lambda c, t, d: {})
    Base.metadata.create_all(charter.engine)
    with charter.runtime.sessions() as session:
        session.add(Ticket(tenant_id="acme", owner="alice", state="new"))
        session.commit()
        ticket = session.query(Ticket).one().id
    with pytest.raises(NotFound):  # bob may not read alice's ticket: not "it is new"
        charter.execute(BOB, "ticket.approve", target=ticket)
    with pytest.raises(InvalidTransition):
        charter.execute(ALICE, "ticket.approve", target=ticket)


def test_a_guard_in_the_policy_language_must_hold_for_the_step_to_be_possible(tickets):
    ticket = new_ticket(tickets, note=None)
    tickets.execute(ALICE, "ticket.open", target=ticket)
    with pytest.raises(InvalidTransition, match=r"R\.note\.is_not_none\(\)"):
        tickets.execute(BOB, "ticket.approve", target=ticket)
    assert "open" == state(tickets, ticket)


def test_a_final_state_allows_nothing_and_says_so(tickets):
    ticket = new_ticket(tickets)
    tickets.execute(ALICE, "ticket.close", target=ticket)
    with pytest.raises(InvalidTransition, match="a final state") as info:
        tickets.execute(ALICE, "ticket.close", target=ticket)
    assert [] == info.value.attrs["allowed"]


# -- concurrency ----------------------------------------------------------------------------


APPROVERS = 50


def _approve_all(charter: Charter, ticket: int, workers: int, barrier: Any) -> list[str]:
    def approve(_: int) -> str:
        barrier.wait()
        try:
            charter.execute(BOB, "ticket.approve", target=ticket)
        except InvalidTransition:
            return "invalid_transition"
        return "ok"

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(approve, range(workers)))


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_50_concurrent_approvals_on_threads_give_one_approval_and_49_clean_409s(tickets):
    ticket = new_ticket(tickets)
    tickets.execute(ALICE, "ticket.open", target=ticket)
    results = _approve_all(tickets, ticket, APPROVERS, threading.Barrier(APPROVERS))
    assert (1, APPROVERS - 1) == (results.count("ok"), results.count("invalid_transition"))
    entries = tickets.history("test_wf_tickets", ticket)
    assert 1 == sum(e["action"] == "ticket.approve" and e["outcome"] == "ok" for e in entries)
    assert tickets.verify_audit().ok


def _process_worker(url: str, ticket: int, threads: int, barrier: Any, out: Any) -> None:
    charter = declare(Charter(database_url=url, audit_keys=AUDIT_KEYS))
    try:
        out.put(_approve_all(charter, ticket, threads, barrier))
    finally:
        charter.close()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_50_concurrent_approvals_from_10_processes_give_one_approval(tickets, database_url):
    ticket = new_ticket(tickets)
    tickets.execute(ALICE, "ticket.open", target=ticket)
    context = multiprocessing.get_context("spawn")
    processes, threads = 10, APPROVERS // 10
    barrier, out = context.Barrier(APPROVERS), context.Queue()
    workers = [
        context.Process(target=_process_worker, args=(database_url, ticket, threads, barrier, out))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    results = [r for _ in workers for r in out.get(timeout=120)]
    for worker in workers:
        worker.join(timeout=60)
    assert (1, APPROVERS - 1) == (results.count("ok"), results.count("invalid_transition"))
    assert "approved" == state(tickets, ticket)


# -- only the gate writes the state -----------------------------------------------------------


def test_a_handler_that_writes_the_state_is_refused_at_flush_and_nothing_is_written(
    database_url, disposing
):
    charter = disposing(declare(Charter(database_url=database_url, audit_keys=AUDIT_KEYS)))

    @charter.action("ticket.force", on=Ticket, allow=True)
    def force(ctx: Any, ticket: Ticket, _: Any) -> None:
        ticket.note = "forced"
        ticket.state = "approved"

    Base.metadata.create_all(charter.engine)
    ticket = new_ticket(charter)
    with pytest.raises(Forbidden, match="only change through its workflow"):
        charter.execute(ALICE, "ticket.force", target=ticket)
    assert "new" == state(charter, ticket)
    with charter.session() as session:
        assert "n" == session.get(Ticket, ticket).note  # the whole call rolled back
    assert "workflow" == charter.history("test_wf_tickets", ticket)[-1]["rule"]


def test_a_transition_cannot_write_another_records_state(database_url, disposing):
    charter = disposing(declare(Charter(database_url=database_url, audit_keys=AUDIT_KEYS)))

    @charter.action("ticket.open_both", on=Ticket, allow=True)
    def both(ctx: Any, ticket: Ticket, _: Any) -> None:
        other = ctx.session.get(Ticket, ticket.id + 1)
        other.state = "open"

    Base.metadata.create_all(charter.engine)
    first, second = new_ticket(charter), new_ticket(charter)
    with pytest.raises(Forbidden):
        charter.execute(ALICE, "ticket.open_both", target=first)
    assert ("new", "new") == (state(charter, first), state(charter, second))


def test_a_record_created_in_another_state_than_the_initial_one_is_refused(tickets):
    @tickets.action("ticket.import_one", on=Ticket, creates=True, allow=True)
    def import_one(ctx: Any, _: None, __: Any) -> Ticket:
        ticket = Ticket(owner="x", state="approved")
        ctx.session.add(ticket)
        return ticket

    with pytest.raises(Forbidden):
        tickets.execute(ALICE, "ticket.import_one")


def test_bulk_updates_and_imports_of_the_state_are_refused(tickets):
    ticket = new_ticket(tickets)

    @tickets.action("ticket.bulk", on=None, allow=True)
    def bulk(ctx: Any, _: None, __: Any) -> None:
        ctx.session.execute(update(Ticket).where(Ticket.id == ticket).values(state="approved"))

    @tickets.action("ticket.import_many", on=None, allow=True)
    def import_many(ctx: Any, _: None, __: Any) -> None:
        rows = [{"tenant_id": "acme", "owner": "x", "state": "approved", "version": 1}]
        ctx.session.execute(insert(Ticket), rows)

    @tickets.action("ticket.import_new", on=None, allow=True)
    def import_new(ctx: Any, _: None, __: Any) -> None:
        rows = [{"tenant_id": "acme", "owner": "x", "state": "new", "version": 1}]
        ctx.session.execute(insert(Ticket), rows)

    for action in ("ticket.bulk", "ticket.import_many"):
        with pytest.raises(Forbidden):
            tickets.execute(ALICE, action)
    assert "new" == state(tickets, ticket)
    tickets.execute(ALICE, "ticket.import_new")  # rows in the initial state may be imported


def _columns(**values: Any) -> tuple[Any, ...]:
    """A positional row of ``Ticket``'s table, its columns in order."""
    return tuple(values.get(c.key) for c in Ticket.__table__.c)


#: Writes of the state in the other forms SQLAlchemy takes (each refused; nothing written).
STATE_WRITES: dict[str, Any] = {
    "multi-values insert": lambda s, t: s.execute(
        insert(Ticket).values(
            [
                {"tenant_id": "acme", "owner": "x", "state": "new", "version": 1},
                {"tenant_id": "acme", "owner": "y", "state": "approved", "version": 1},
            ]
        )
    ),
    "multi-values insert of positional rows": lambda s, t: s.execute(
        insert(Ticket).values(
            [_columns(id=100, tenant_id="acme", owner="x", state="approved", version=1)]
        )
    ),
    "insert from select": lambda s, t: s.execute(
        insert(Ticket).from_select(
            ["tenant_id", "owner", "state", "version"],
            select(Ticket.tenant_id, Ticket.owner, literal("approved"), Ticket.version),
        )
    ),
    "update by primary key": lambda s, t: s.execute(
        update(Ticket), [{"id": t, "state": "approved"}]
    ),
    "update to an expression": lambda s, t: s.execute(
        update(Ticket).where(Ticket.id == t).values(state=func.lower("APPROVED"))
    ),
    "upsert setting the state": lambda s, t: s.execute(
        (postgresql if s.get_bind().dialect.name == "postgresql" else sqlite)
        .insert(Ticket)
        .values(id=t, tenant_id="acme", owner="x", state="new", version=1)
        .on_conflict_do_update(index_elements=["id"], set_={"state": "approved"})
    ),
    "legacy bulk_update_mappings": lambda s, t: s.bulk_update_mappings(
        Ticket, [{"id": t, "state": "approved"}]
    ),
}


@pytest.mark.parametrize("write", list(STATE_WRITES))
def test_the_state_written_in_any_bulk_form_is_refused(tickets, write):
    ticket = new_ticket(tickets)

    @tickets.action("ticket.write_state", on=None, allow=True)
    def write_state(ctx: Any, _: None, __: Any) -> None:
        STATE_WRITES[write](ctx.session, ticket)

    with pytest.raises(Forbidden):
        tickets.execute(ALICE, "ticket.write_state")
    with tickets.session() as session:
        assert [("new",)] == session.execute(select(Ticket.state)).all()


def test_an_input_model_carrying_the_state_is_refused_at_declaration():
    charter = declare(Charter(database_url="sqlite://", development=True))

    class SetState(BaseModel):
        model_config = ConfigDict(extra="forbid")
        state: str

    with pytest.raises(ConfigurationError, match="only the workflow of test_wf_tickets writes"):
        charter.action("ticket.edit", on=Ticket, input=SetState, allow=True)(lambda c, t, d: {})


def test_a_workflow_is_declared_before_its_actions_and_validated():
    charter = declare(Charter(database_url="sqlite://", development=True), workflow=False)
    with pytest.raises(ConfigurationError, match="before its actions"):
        charter.workflow(Ticket, states=("new",), initial="new", transitions=())
    fresh = Charter(database_url="sqlite://", development=True)
    fresh.resource(Ticket, tenant="tenant_id", state="state", version="version")
    bad = [
        dict(states=("new",), initial="old", transitions=()),
        dict(states=("new",), initial="new", transitions=(Transition("t.x", "new", "gone"),)),
        dict(states=("new", "new"), initial="new", transitions=()),
        dict(states=("new",), initial="new", transitions=(), expires={"new": timedelta(1)}),
    ]
    for options in bad:
        with pytest.raises(ConfigurationError):
            fresh.workflow(Ticket, **options)


def test_a_resource_without_a_workflow_keeps_writing_its_state_as_before(database_url, disposing):
    charter = disposing(
        declare(Charter(database_url=database_url, audit_keys=AUDIT_KEYS), workflow=False)
    )

    @charter.action("ticket.force", on=Ticket, allow=True)
    def force(ctx: Any, ticket: Ticket, _: Any) -> None:
        ticket.state = "approved"

    Base.metadata.create_all(charter.engine)
    ticket = new_ticket(charter)
    charter.execute(ALICE, "ticket.force", target=ticket)
    assert "approved" == state(charter, ticket)
    assert "transition" not in charter.pipeline_of("ticket.force").names


def test_only_the_actions_that_perform_a_transition_get_its_stages(tickets):
    names = tickets.pipeline_of("ticket.approve").names
    load = "claim_and_load" if tickets.runtime.postgres else "load"
    assert names.index(load) < names.index("transition") < names.index("decide")
    assert names.index("decide") < names.index("advance") < names.index("handler")
    assert "transition" not in tickets.pipeline_of("ticket.get").names
    assert "state_guard" in tickets.pipeline_of("ticket.get").names  # every action on it


def test_a_declared_transition_adds_no_statement_to_a_hand_coded_state_check(
    tickets, database_url, disposing
):
    hand = disposing(
        declare(Charter(database_url=database_url, audit_keys=AUDIT_KEYS), workflow=False)
    )

    @hand.action("ticket.promote", on=Ticket, allow=True)
    def promote(ctx: Any, ticket: Ticket, _: Any) -> None:
        if ticket.state != "new":
            raise DomainError("not new")
        ticket.state = "open"

    first, second = new_ticket(tickets), new_ticket(tickets)
    declared = count_statements(
        tickets, lambda: tickets.execute(ALICE, "ticket.open", target=first)
    )
    coded = count_statements(hand, lambda: hand.execute(ALICE, "ticket.promote", target=second))
    assert coded == declared


# -- allowed_actions and the matrix -------------------------------------------------------------


def test_allowed_actions_tells_not_possible_now_from_not_allowed_for_you(tickets):
    ticket = new_ticket(tickets)
    with tickets.session() as session:
        record = session.get(Ticket, ticket)
    decisions = tickets.allowed_actions(BOB, record)
    approve, open_, close = (
        decisions[a] for a in ("ticket.approve", "ticket.open", "ticket.close")
    )
    assert (False, False, DecisionKind.INVALID_TRANSITION) == (
        approve.allowed, approve.possible, approve.kind,
    )  # fmt: skip
    assert (False, True) == (open_.allowed, open_.possible)  # possible, but bob is no member
    assert (False, True) == (close.allowed, close.possible)
    assert tickets.allowed_actions(ALICE, record)["ticket.open"].allowed


def test_the_matrix_and_the_sql_filter_know_the_workflow(tickets):
    matrix = tickets.matrix(roles=["member", "approver"], states=["new", "open"])
    assert "deny" == matrix.cell("approver", "ticket.approve", "new").outcome
    assert "conditional" == matrix.cell("approver", "ticket.approve", "open").outcome  # the guard
    from sqlalchemy import select

    sql = str(tickets.filter(select(Ticket), BOB, "ticket.approve"))
    assert "state" in sql


# -- flows that span several requests ------------------------------------------------------------


STEPS = (
    Transition("ticket.open", "new", "open"),
    Transition("ticket.approve", "open", "approved", requires=("ticket.open",)),
    Transition("ticket.close", ("new", "open"), "closed"),
)


@pytest.fixture
def flow(database_url: str, disposing: Callable[[Any], Any]) -> tuple[Charter, Clock]:
    clock = Clock()
    charter = disposing(
        declare(
            Charter(database_url=database_url, audit_keys=AUDIT_KEYS, clock=clock),
            transitions=STEPS, deadline="deadline", log="steps",
            expires={"new": timedelta(minutes=15), "open": timedelta(minutes=5)},
        )
    )  # fmt: skip
    Base.metadata.create_all(charter.engine)
    return charter, clock


def test_each_step_has_a_deadline_and_a_late_step_is_refused(flow):
    charter, clock = flow
    ticket = new_ticket(charter)
    clock.now += timedelta(minutes=14)
    charter.execute(ALICE, "ticket.open", target=ticket)  # within 15 minutes of the start
    clock.now += timedelta(minutes=5)
    with pytest.raises(StepExpired) as info:  # the next one had 5 minutes
        charter.execute(BOB, "ticket.approve", target=ticket)
    assert (409, "step_expired") == (info.value.status, info.value.code)
    assert "open" == state(charter, ticket)


def test_the_terminal_step_verifies_the_earlier_steps_in_the_gates_own_log(flow):
    charter, _ = flow
    ticket = new_ticket(charter)
    charter.execute(ALICE, "ticket.open", target=ticket)
    with charter.session() as session:
        log = session.get(Ticket, ticket).steps
    assert [("ticket.open", "new", "open", "alice")] == [
        (s["action"], s["from"], s["to"], s["by"]) for s in log
    ]
    # Someone moves the state with a hand-written statement (outside every guarantee):
    with Session(charter.engine) as session:
        session.execute(update(Ticket).where(Ticket.id == ticket).values(steps=[]))
        session.commit()
    with pytest.raises(InvalidTransition, match=r"needs ticket\.open completed first"):
        charter.execute(BOB, "ticket.approve", target=ticket)


def test_a_completed_flow_cannot_be_replayed(flow):
    charter, _ = flow
    ticket = new_ticket(charter)
    charter.execute(ALICE, "ticket.open", target=ticket)
    charter.execute(BOB, "ticket.approve", target=ticket)
    for action, actor in (("ticket.approve", BOB), ("ticket.open", ALICE)):
        with pytest.raises(InvalidTransition):
            charter.execute(actor, action, target=ticket)


def test_the_deadline_and_the_log_are_the_gates_to_write(flow):
    charter, _ = flow

    @charter.action("ticket.extend", on=Ticket, allow=True)
    def extend(ctx: Any, ticket: Ticket, _: Any) -> None:
        ticket.deadline = ctx.now + timedelta(days=365)

    ticket = new_ticket(charter)
    with pytest.raises(Forbidden):
        charter.execute(ALICE, "ticket.extend", target=ticket)


# -- the diagram ------------------------------------------------------------------------------


def test_the_state_diagram_in_mermaid_and_dot():
    charter = declare(Charter(database_url="sqlite://", development=True))
    workflow = charter.workflows["test_wf_tickets"]
    text = diagram(workflow, "mermaid")
    assert text.startswith("stateDiagram-v2\n    [*] --> new\n")
    assert "    new --> closed: ticket.close\n" in text
    assert "    open --> closed" in text
    assert "ticket.approve [guarded]" in text
    assert "    approved --> [*]" in text
    dot = diagram(workflow, "dot")
    assert dot.startswith('digraph "test_wf_tickets" {')
    assert '"open" -> "approved"' in dot
    with pytest.raises(ValueError, match="mermaid, dot"):
        diagram(workflow, "svg")


def test_a_refused_transition_is_audited_even_though_the_call_rolled_back(tickets):
    ticket = new_ticket(tickets)
    with pytest.raises(InvalidTransition):
        tickets.execute(BOB, "ticket.approve", target=ticket)
    with tickets.engine.connect() as conn:
        outcomes = conn.execute(audit_table.select().with_only_columns(audit_table.c.outcome)).all()
    assert ("invalid_transition",) in [tuple(r) for r in outcomes]


def test_charter_workflow_show_prints_the_reference_services_diagrams():
    from typer.testing import CliRunner

    from charter.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["workflow", "show", "invoices", "--demo"])
    assert 0 == shown.exit_code, shown.output
    assert "    submitted --> void: invoice.void\n" in shown.output
    dot = runner.invoke(app, ["workflow", "show", "plan_upgrades", "--demo", "--format", "dot"])
    assert '"payment_captured" -> "complete" [label="plan_upgrade.complete"];' in dot.output
    missing = runner.invoke(app, ["workflow", "show", "nope", "--demo"])
    assert 2 == missing.exit_code
    bad = runner.invoke(app, ["workflow", "show", "invoices", "--demo", "--format", "svg"])
    assert 2 == bad.exit_code


def test_a_retried_transition_with_its_key_is_replayed_not_refused(tickets):
    ticket = new_ticket(tickets)
    first = tickets.execute(ALICE, "ticket.open", target=ticket, key="open-1")
    again = tickets.execute(ALICE, "ticket.open", target=ticket, key="open-1")
    assert (first.body, True) == (again.body, again.replayed)
    with pytest.raises(InvalidTransition):  # a new request, not a retry: the step is done
        tickets.execute(ALICE, "ticket.open", target=ticket, key="open-2")


# -- requires= on a path that repeats a step; aliased inputs; allowed_actions' clock;
# -- diagrams of any state name -------------------------------------------------------------

PAYMENT = (
    Transition("pay.verify", ("new", "verified"), "verified"),
    Transition("pay.capture", "verified", "captured"),
    Transition("pay.refund", "captured", "verified"),  # the capture undone: capture again
    Transition("pay.complete", "captured", "complete", requires=("pay.verify", "pay.capture")),
)


@pytest.fixture
def payment(database_url: str, disposing: Callable[[Any], Any]) -> Charter:
    """A flow whose path may loop: verify, capture, refund, capture again, complete."""
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS))
    charter.resource(Ticket, tenant="tenant_id", state="state", version="version")
    charter.workflow(
        Ticket, states=("new", "verified", "captured", "complete"), initial="new",
        transitions=PAYMENT, log="steps",
    )  # fmt: skip

    @charter.action("pay.start", on=Ticket, creates=True, allow=True)
    def start(ctx: Any, _: None, data: Any) -> Ticket:
        ticket = Ticket(owner=ctx.actor.id, state="new")
        ctx.session.add(ticket)
        return ticket

    charter.action("pay.get", on=Ticket, allow=True, sensitive_read=True)(lambda c, t, d: {})
    for t in PAYMENT:
        charter.action(t.action, on=Ticket, allow=True)(lambda c, t, d: {})
    Base.metadata.create_all(charter.engine)
    return charter


def steps_of(charter: Charter, ticket: int) -> list[str]:
    with charter.session() as session:
        found = session.get(Ticket, ticket)
        assert found is not None
        return [s["action"] for s in found.steps or []]


def test_a_path_that_repeats_a_required_step_can_still_complete(payment):
    ticket = int(payment.execute(ALICE, "pay.start").resource_id)
    for action in ("pay.verify", "pay.capture", "pay.refund", "pay.capture", "pay.complete"):
        payment.execute(ALICE, action, target=ticket)
    assert "complete" == state(payment, ticket)
    assert ["pay.verify", "pay.capture", "pay.refund", "pay.capture", "pay.complete"] == (
        steps_of(payment, ticket)
    )


def test_a_required_step_done_again_needs_the_steps_after_it_done_again(payment):
    ticket = int(payment.execute(ALICE, "pay.start").resource_id)
    for action in ("pay.verify", "pay.capture", "pay.refund", "pay.verify"):
        payment.execute(ALICE, action, target=ticket)
    # The state moved by hand to "captured" (outside every guarantee): nothing was captured
    # after the last verification, so the log does not show the required path.
    with Session(payment.engine) as session:
        session.execute(update(Ticket).where(Ticket.id == ticket).values(state="captured"))
        session.commit()
    with pytest.raises(InvalidTransition, match="the latest of each after the latest"):
        payment.execute(ALICE, "pay.complete", target=ticket)
    assert "captured" == state(payment, ticket)


@pytest.mark.parametrize(
    ("done", "complete"),
    [
        (["v", "c"], True),
        (["v", "x", "c"], True),  # other steps between
        (["v", "c", "r", "c"], True),  # a step repeated after the last of the one before
        (["v", "v", "c"], True),
        (["c", "v", "c"], True),  # a stray earlier capture does not matter
        (["v", "c", "v"], False),  # verified again, nothing captured since
        (["c", "v"], False),
        (["v"], False),
        ([], False),
    ],
)
def test_required_steps_count_by_their_latest_completion_in_the_declared_order(done, complete):
    from charter.workflow.model import completed_in_order

    assert complete == completed_in_order(("v", "c"), done)


def test_a_step_required_twice_is_refused_at_declaration():
    charter = Charter(database_url="sqlite://", development=True)
    charter.resource(Ticket, tenant="tenant_id", state="state", version="version")
    twice = Transition("t.done", "b", "c", requires=("t.a", "t.b", "t.a"))
    steps = (Transition("t.a", "a", "b"), Transition("t.b", "a", "b"), twice)
    states = ("a", "b", "c")
    with pytest.raises(ConfigurationError, match=r"requires t\.a twice"):
        charter.workflow(Ticket, states=states, initial="a", transitions=steps, log="steps")


def _input_with(field: Any) -> type[BaseModel]:
    from pydantic import create_model

    model: type[BaseModel] = create_model(
        "Edit", __config__=ConfigDict(extra="forbid"), note=(str | None, field)
    )
    return model


def _aliases() -> dict[str, Any]:
    from pydantic import AliasChoices, AliasPath, Field

    return {
        "alias": Field(None, alias="state"),
        "validation_alias": Field(None, validation_alias="state"),
        "alias_choices": Field(None, validation_alias=AliasChoices("status", "state")),
        "alias_path": Field(None, validation_alias=AliasPath("state", 0)),
        "path_among_choices": Field(None, validation_alias=AliasChoices(AliasPath("state", "x"))),
        "serialization_alias": Field(None, serialization_alias="state"),
    }


@pytest.mark.parametrize("form", list(_aliases()))
def test_an_input_field_reaching_the_state_under_any_alias_is_refused_at_declaration(form):
    charter = declare(Charter(database_url="sqlite://", development=True))
    with pytest.raises(ConfigurationError, match="only the workflow of test_wf_tickets writes"):
        charter.action("ticket.edit", on=Ticket, input=_input_with(_aliases()[form]), allow=True)(
            lambda c, t, d: {}
        )


def test_an_input_field_with_unrelated_alias_choices_or_paths_is_declared():
    from pydantic import AliasChoices, AliasPath, Field

    charter = declare(Charter(database_url="sqlite://", development=True))
    unrelated = (
        Field(None, validation_alias=AliasChoices("note", "comment")),
        Field(None, validation_alias=AliasPath("data", "state")),  # only the key "data"
        Field(None, validation_alias=AliasChoices(AliasPath("data", 0), "remark")),
    )
    for i, field in enumerate(unrelated):
        edit = _input_with(field)
        charter.action(f"ticket.edit{i}", on=Ticket, input=edit, allow=True)(lambda c, t, d: {})
    assert {"ticket.edit0", "ticket.edit1", "ticket.edit2"} <= set(charter.actions)


def test_allowed_actions_without_a_context_judges_deadlines_by_the_charters_clock(flow):
    charter, clock = flow
    ticket = new_ticket(charter)  # ticket.open within 15 minutes, by the Charter's clock

    def decision() -> Any:
        with charter.session() as session:
            record = session.get(Ticket, ticket)
            session.expunge(record)
        return charter.allowed_actions(ALICE, record)["ticket.open"]

    assert (True, True) == (decision().allowed, decision().possible)  # whatever the wall clock
    clock.now += timedelta(days=365 * 100)
    late = decision()
    assert (False, DecisionKind.INVALID_TRANSITION) == (late.possible, late.kind)
    with pytest.raises(StepExpired):  # execute() agrees
        charter.execute(ALICE, "ticket.open", target=ticket)


def odd_names(charter: Charter) -> Any:
    charter.resource(Ticket, tenant="tenant_id", state="state", version="version")
    return charter.workflow(
        Ticket,
        states=("new", "in review", "geprüft", 'on-hold: "legal"; #1', "s1", "default"),
        initial="new",
        transitions=(
            Transition("claim.review", "new", "in review"),
            Transition("claim.check", "in review", "geprüft"),
            Transition("claim.hold", "geprüft", 'on-hold: "legal"; #1'),
            Transition("claim.skip", "new", "s1"),
            Transition("claim.drop", "s1", "default"),
        ),
        deadline="deadline",
        expires={"in review": timedelta(minutes=15)},
    )


def test_mermaid_names_each_odd_state_by_an_identifier_and_shows_its_name_escaped():
    workflow = odd_names(Charter(database_url="sqlite://", development=True))
    assert (
        "stateDiagram-v2\n"
        '    state "in review" as s1_\n'  # "s1" is a state's own name
        '    state "geprüft" as s2\n'
        '    state "on-hold#58; #34;legal#34;#59; #35;1" as s3\n'
        '    state "default" as s5\n'  # a keyword of Mermaid's
        "    [*] --> new\n"
        "    new --> s1_: claim.review (next step within 15min)\n"
        "    s1_ --> s2: claim.check\n"
        "    s2 --> s3: claim.hold\n"
        "    new --> s1: claim.skip\n"
        "    s1 --> s5: claim.drop\n"
        "    s3 --> [*]\n"
        "    s5 --> [*]\n"
    ) == diagram(workflow, "mermaid")


def test_dot_quotes_every_name_and_keeps_non_ascii_as_utf8():
    workflow = odd_names(Charter(database_url="sqlite://", development=True))
    text = diagram(workflow, "dot")
    assert '    "geprüft" [shape=box];\n' in text
    assert '    "in review" -> "geprüft" [label="claim.check"];\n' in text
    assert '    "on-hold: \\"legal\\"; #1" [shape=doublecircle];\n' in text
    assert "\\u" not in text


def test_a_state_named_with_a_control_character_is_refused_at_declaration():
    for name in ("x\n    [*] --> paid", "nul\x00", "tab\there", "rtl\u202eevil"):
        charter = Charter(database_url="sqlite://", development=True)
        charter.resource(Ticket, tenant="tenant_id", state="state", version="version")
        with pytest.raises(ConfigurationError, match="unprintable"):
            charter.workflow(Ticket, states=("new", name), initial="new", transitions=())


def test_no_name_adds_a_line_to_a_diagram_even_one_built_by_hand():
    import dataclasses
    import re

    charter = Charter(database_url="sqlite://", development=True)
    declared = odd_names(charter)
    evil = 'x"\n    [*] --> paid\\'
    workflow = dataclasses.replace(declared, states=(*declared.states, evil, "paid"))
    mermaid = diagram(workflow, "mermaid")
    assert '    state "x#34;#10;    [*] --#62; paid#92;" as s6\n' in mermaid
    shapes = r'stateDiagram-v2|    state "[^"]*" as \w+|    (\[\*\]|\w+) --> (\[\*\]|\w+)(: .*)?'
    assert all(re.fullmatch(shapes, line) for line in mermaid.splitlines())
    assert "    [*] --> paid" not in mermaid.splitlines()
    dot = diagram(workflow, "dot")
    assert '    "x\\"\\n    [*] --> paid\\\\" [shape=doublecircle];\n' in dot
    assert all(line.endswith((" {", ";", "}")) for line in dot.splitlines())
