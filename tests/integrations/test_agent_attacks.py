"""Attacks on the agent channel's confirmations: what an approver is shown, and the caps on
waiting requests.

* Approving an agent's request answers with the action's body: it is the agent-for-user's
  view, and it must also be the approver's (a field hidden from the approver stays hidden).
* ``AgentChannel(max_pending=)`` is per agent in a tenant, counted over every waiting
  request (not the tenant's N oldest), and ``max_tenant_pending=`` bounds a tenant, so a
  flood cannot push requests out of ``GET /agent/confirmations``.

On a small service of its own (the reference service's ``invoices`` table, an approver role
for ``invoice.void``, a finance-only ``bank_account``), SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select

from charter import A, Actor, Agent, Charter, ConfigurationError, ConfirmationNotPending, R
from charter.confirmations import ConfirmationState, confirmation_table
from charter.context import ActionContext
from charter.demo.models import Invoice
from charter.integrations.agent import AgentChannel
from charter.testing import FrozenClock
from charter.tokens import TokenSigner

AUDIT_KEYS = {"k1": "test-audit-key-0123456789abcdef"}
SECRET = "agent-attack-token-secret-0123456789"
IBAN = "DE89370400440532013000"
SCOPES = {"invoices:read", "invoices:write"}

USERS = {
    (a.tenant, a.id): a
    for a in (
        Actor.make("fiona", "acme", roles={"member", "finance"}),
        Actor.make("alice", "acme", roles={"member"}),
        Actor.make("mike", "acme", roles={"manager"}),
        Actor.make("ada", "acme", kind="agent", roles={"assistant"}),
        Actor.make("bea", "acme", kind="agent", roles={"assistant"}),
        Actor.make("gina", "globex", roles={"member"}),
        Actor.make("ada", "globex", kind="agent", roles={"assistant"}),
    )
}


def directory(tenant: str, user_id: str) -> Actor | None:
    return USERS.get((tenant, user_id))


def person(tenant: str, name: str, scopes: set[str] = SCOPES) -> Actor:
    found = USERS[(tenant, name)]
    return Actor.make(found.id, found.tenant, roles=found.roles, scopes=scopes)


FIONA, ALICE, MIKE, GINA = (person("acme", "fiona"), person("acme", "alice"),
                            person("acme", "mike"), person("globex", "gina"))  # fmt: skip


class Create(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Decimal
    bank_account: str | None = None


def view(invoice: Invoice) -> dict[str, Any]:
    return {"id": invoice.id, "state": invoice.state, "amount": str(invoice.amount),
            "created_by": invoice.created_by, "bank_account": invoice.bank_account}  # fmt: skip


def build(charter: Charter) -> Charter:
    charter.resource(Invoice, tenant="tenant_id", state="state", version="version", view=view,
                     visible={"bank_account": A.has_role("finance")})  # fmt: skip
    charter.allow_impersonation("assistant-for-staff", by="assistant",
                                of_roles={"member", "finance"}, scopes=SCOPES)  # fmt: skip
    staff = A.has_role("member") | A.has_role("manager")
    creator = R.created_by == A.id

    @charter.action("invoice.create", on=Invoice, input=Create, creates=True, allow=staff,
                    scope="invoices:write")  # fmt: skip
    def create(ctx: ActionContext, _: Any, data: Create) -> Invoice:
        invoice = Invoice(tenant_id=ctx.actor.tenant_id, customer="ACME", amount=data.amount,
                          currency="EUR", state="draft", created_by=ctx.actor.subject.id,
                          created_at=ctx.now, bank_account=data.bank_account)  # fmt: skip
        assert ctx.session is not None
        ctx.session.add(invoice)
        ctx.session.flush()
        return invoice

    @charter.action("invoice.get", on=Invoice, allow=staff, scope="invoices:read", agent=True)
    def get(ctx: ActionContext, invoice: Invoice, _: Any) -> Invoice:
        """Read an invoice."""
        return invoice

    @charter.action("invoice.void", on=Invoice, allow=creator | A.has_role("manager"),
                    scope="invoices:write",
                    agent=Agent(confirm=True, approvers={"manager"}))  # fmt: skip
    def void(ctx: ActionContext, invoice: Invoice, _: Any) -> Invoice:
        """Void an invoice (a person confirms)."""
        invoice.state = "void"
        return invoice

    return charter


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def charter(database_url: str, clock: FrozenClock) -> Iterator[Charter]:
    instance = build(Charter(database_url=database_url, audit_keys=AUDIT_KEYS, clock=clock))
    yield instance
    instance.close()


def channel(charter: Charter, **caps: int) -> AgentChannel:
    return AgentChannel(charter, directory=directory, signer=TokenSigner([SECRET]), **caps)


@pytest.fixture
def agents(charter: Charter) -> AgentChannel:
    return channel(charter)


def agent_for(who: Actor, agent: str = "ada") -> Actor:
    found = USERS[(who.tenant, agent)]
    real = Actor.make(found.id, found.tenant, kind="agent", roles=found.roles, scopes=SCOPES)
    return real.impersonate(USERS[(who.tenant, who.id)])


def invoice_of(charter: Charter, who: Actor) -> int:
    out = charter.execute(who, "invoice.create", {"amount": "10", "bank_account": IBAN})
    return int(out.body["id"])


def ask_void(agents: AgentChannel, who: Actor, invoice: int, agent: str = "ada", n: int = 0) -> str:
    result = agents.call(agent_for(who, agent), "invoice.void",
                         {"purpose": f"duplicate {n}", "target": invoice})  # fmt: skip
    assert "pending_confirmation" == result.status
    return str(result.body["id"])


def waiting(charter: Charter, tenant: str) -> int:
    t = confirmation_table
    with charter.engine.connect() as conn:
        where = (t.c.tenant == tenant, t.c.state == ConfirmationState.PENDING)
        return int(conn.execute(select(func.count()).where(*where)).scalar_one())


# -- 2. what an approver is shown -----------------------------------------------------------------


def test_an_approver_is_not_shown_a_field_hidden_from_them(charter, agents):
    """mike (manager, an approver of invoice.void, not finance) approves ada-for-fiona's void:
    the answer leaves bank_account out, as his own read does."""
    invoice = invoice_of(charter, FIONA)
    assert "bank_account" not in charter.execute(MIKE, "invoice.get", target=invoice).body
    pending = ask_void(agents, FIONA, invoice)
    outcome = agents.approve(MIKE, pending)
    assert "void" == outcome.body["state"]
    assert "bank_account" not in outcome.body
    assert IBAN not in repr(outcome.body)
    assert ConfirmationState.EXECUTED == agents.get(MIKE, pending).state
    # What the agent-for-fiona may see is unchanged: fiona (finance) reads it back.
    assert IBAN == charter.execute(FIONA, "invoice.get", target=invoice).body["bank_account"]


def test_the_user_approving_sees_what_both_they_and_their_agent_may_see(charter, agents):
    invoice = invoice_of(charter, FIONA)
    outcome = agents.approve(FIONA, ask_void(agents, FIONA, invoice))
    assert ("void", IBAN) == (outcome.body["state"], outcome.body["bank_account"])


def test_the_approve_route_answers_the_approvers_view(charter, agents):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from charter.integrations.agentapi import confirmation_routes
    from charter.integrations.fastapi import CharterRoutes

    signer = TokenSigner([SECRET])
    app = FastAPI()
    routes = CharterRoutes(app, charter, authenticate=lambda request: signer.authenticate(
        request.headers.get("authorization"), directory))  # fmt: skip
    routes.action("invoice.get")
    confirmation_routes(routes, agents)
    mike = {"Authorization": f"Bearer {signer.issue('mike', 'acme', scopes=SCOPES)}"}
    invoice = invoice_of(charter, FIONA)
    pending = ask_void(agents, FIONA, invoice)
    with TestClient(app, raise_server_exceptions=False) as client:
        approved = client.post(f"/agent/confirmations/{pending}/approve", headers=mike)
        assert (200, "void") == (approved.status_code, approved.json()["state"])
        assert "bank_account" not in approved.json()
        assert IBAN not in approved.text


# -- 5. the caps on waiting requests --------------------------------------------------------------


def test_one_agent_cannot_leave_more_than_max_pending_waiting_whatever_the_others_do(charter):
    """Once ada has N waiting, bea may still leave N, and not one more (the count was taken
    over the tenant's N oldest requests only, all ada's: bea was never counted)."""
    agents = channel(charter, max_pending=3)
    invoice = invoice_of(charter, ALICE)
    for n in range(3):
        ask_void(agents, ALICE, invoice, "ada", n)
    with pytest.raises(ConfirmationNotPending, match="3 requests of this agent"):
        ask_void(agents, ALICE, invoice, "ada")
    for n in range(3):
        ask_void(agents, ALICE, invoice, "bea", n)
    with pytest.raises(ConfirmationNotPending, match="3 requests of this agent"):
        ask_void(agents, ALICE, invoice, "bea")
    assert 6 == waiting(charter, "acme")
    # The same agent id in another tenant is another agent's count.
    ask_void(agents, GINA, invoice_of(charter, GINA), "ada")


def test_a_decided_or_expired_request_no_longer_counts(charter, clock):
    agents = channel(charter, max_pending=2)
    invoice = invoice_of(charter, ALICE)
    first = ask_void(agents, ALICE, invoice)
    ask_void(agents, ALICE, invoice)
    agents.reject(ALICE, first)
    ask_void(agents, ALICE, invoice)  # a rejected request frees its place
    with pytest.raises(ConfirmationNotPending):
        ask_void(agents, ALICE, invoice)
    clock.advance(timedelta(hours=24))
    ask_void(agents, ALICE, invoice)  # expired ones too
    ask_void(agents, ALICE, invoice)


def test_a_tenant_cap_keeps_every_waiting_request_in_view(charter):
    agents = channel(charter, max_pending=3, max_tenant_pending=4)
    invoice = invoice_of(charter, ALICE)
    ids = [ask_void(agents, ALICE, invoice, "ada", n) for n in range(3)]
    ids.append(ask_void(agents, ALICE, invoice, "bea"))
    with pytest.raises(ConfirmationNotPending, match=r"4 requests already wait .* in this tenant"):
        ask_void(agents, ALICE, invoice, "bea")
    assert 4 == waiting(charter, "acme")
    assert sorted(ids) == sorted(p.id for p in agents.pending(MIKE, limit=200))
    ask_void(agents, GINA, invoice_of(charter, GINA))  # another tenant is not full


def test_the_caps_are_positive_integers(charter):
    for bad in ({"max_pending": 0}, {"max_tenant_pending": 0}, {"max_pending": True}):
        with pytest.raises(ConfigurationError):
            channel(charter, **bad)


def test_concurrent_requests_never_exceed_the_cap(charter):
    """Counted and inserted under the tenant's lock (PostgreSQL: an advisory lock; SQLite:
    the write transaction): eight agents' requests at once leave exactly max_pending."""
    agents = channel(charter, max_pending=3)
    invoice = invoice_of(charter, ALICE)
    barrier, results = threading.Barrier(8), []

    def ask(n: int) -> None:
        barrier.wait()
        try:
            ask_void(agents, ALICE, invoice, "ada", n)
            results.append("pending")
        except ConfirmationNotPending as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ["confirmation_not_pending"] * 5 + ["pending"] * 3 == sorted(results)
    assert 3 == waiting(charter, "acme")
