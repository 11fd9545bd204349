"""Agent tools (issue 12, item 6): which tools an agent-for-user sees, each call through the gate
on channel agent, audited with both identities and the purpose, and the confirmation flow.

On the reference service's declarations (ada, an agent, acts for members and approvers
under the grant ``assistant-for-staff``), SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from charter import (
    A,
    Actor,
    Agent,
    Charter,
    ConfigurationError,
    ConfirmationExpired,
    ConfirmationForbidden,
    ConfirmationNotPending,
    Forbidden,
    InvalidInput,
    InvalidTransition,
    Unauthenticated,
    UnknownAction,
)
from charter.audit.entry import audit_table
from charter.confirmations import ConfirmationState
from charter.demo.service import DEMO_USERS, build_charter, directory
from charter.integrations.agent import AgentChannel
from charter.testing import FrozenClock
from charter.tokens import TokenSigner

AUDIT_KEYS = {"k1": "test-audit-key-0123456789abcdef"}
SECRET = "agent-test-token-secret-0123456789"
PURPOSE = "alice asked me to tidy up her drafts"


def user(name: str) -> Actor:
    return next(a for (_, uid), a in DEMO_USERS.items() if uid == name)


ADA, ALICE, BOB, CAROL, FIONA, SAM = map(user, ("ada", "alice", "bob", "carol", "fiona", "sam"))
SCOPES = {"invoices:read", "invoices:write"}


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def charter(database_url: str, clock: FrozenClock) -> Iterator[Charter]:
    instance = build_charter(Charter(database_url=database_url, audit_keys=AUDIT_KEYS, clock=clock))
    yield instance
    instance.close()


@pytest.fixture
def agents(charter: Charter) -> AgentChannel:
    return AgentChannel(charter, directory=directory, signer=TokenSigner([SECRET]))


def ada_for(who: Actor, scopes: set[str] = SCOPES) -> Actor:
    return Actor.make("ada", "acme", kind="agent", roles={"assistant"}, scopes=scopes).impersonate(
        who
    )


def draft(agents: AgentChannel, who: Actor = ALICE, **extra: Any) -> int:
    data = {"customer": "ACME", "amount": "120.00", **extra}
    result = agents.call(ada_for(who), "invoice.create", {"purpose": PURPOSE, "input": data})
    return int(result.body["id"])


def entries(charter: Charter, action: str) -> list[Any]:
    with charter.engine.connect() as conn:
        return list(
            conn.execute(
                select(audit_table).where(audit_table.c.action == action).order_by(audit_table.c.id)
            )
        )


# -- which tools, described how ----------------------------------------------------------------


def test_an_agent_for_a_member_sees_the_exposed_actions_it_could_be_allowed(charter):
    names = [t.name for t in charter.tools(ada_for(ALICE))]
    # invoice.approve is not exposed; invoice.remind is not either (impersonation=False).
    assert ["invoice.create", "invoice.get", "invoice.submit", "invoice.void"] == names


def test_nothing_is_listed_for_a_user_an_agent_without_grant_or_a_token_without_scopes(charter):
    assert () == charter.tools(ALICE)  # a user, not an agent acting for one
    assert () == charter.tools(Actor.make("ada", "acme", kind="agent", roles={"assistant"}))
    assert () == charter.tools(ada_for(CAROL))  # an admin: no grant reaches her
    rogue = Actor.make("rex", "acme", kind="agent", roles={"crawler"}, scopes=SCOPES)
    assert () == charter.tools(rogue.impersonate(ALICE))  # no grant for its roles
    assert ["invoice.get"] == [t.name for t in charter.tools(ada_for(ALICE, {"invoices:read"}))]


def test_a_tool_the_rules_can_never_allow_is_not_listed(clock):
    charter = Charter(database_url="sqlite://", development=True, clock=clock)

    class Input(BaseModel):
        model_config = ConfigDict(extra="forbid")

    charter.allow_impersonation("a", by="assistant", of_roles={"member"}, scopes={"*"})

    @charter.action("report.run", input=Input, allow=A.has_role("auditor"), agent=True)
    def run(ctx, _, __):
        """Run the report."""

    assert () == charter.tools(ada_for(ALICE, {"*"}))
    auditor = Actor.make("una", "acme", roles={"member", "auditor"})
    charter.allow_impersonation("b", by="assistant", of_roles={"member", "auditor"}, scopes={"*"})
    assert ["report.run"] == [t.name for t in charter.tools(ada_for(auditor, {"*"}))]


def test_annotations_state_every_hint_from_the_declaration(charter):
    tools = {t.name: t for t in charter.tools(ada_for(ALICE))}
    get, submit, void = tools["invoice.get"], tools["invoice.submit"], tools["invoice.void"]
    assert {"title": "invoice.get", "readOnlyHint": True, "destructiveHint": False,
            "idempotentHint": True, "openWorldHint": False} == get.annotations  # fmt: skip
    assert {"title": "invoice.submit", "readOnlyHint": False, "destructiveHint": False,
            "idempotentHint": False, "openWorldHint": False} == submit.annotations  # fmt: skip
    assert "Read one invoice (audited)." == get.description  # the handler's docstring
    assert void.confirmation
    assert not submit.confirmation
    assert "a person confirms it first" in void.description


def test_irreversible_external_and_keyed_actions_are_destructive_open_and_idempotent(clock):
    charter = Charter(database_url="sqlite://", development=True, clock=clock)
    from charter.demo.models import Invoice

    charter.resource(Invoice, tenant="tenant_id")
    charter.allow_impersonation("a", by="assistant", of_roles={"member"}, scopes={"*"})

    @charter.action("invoice.send", on=Invoice, allow=A.has_role("member"), tags={"irreversible"},
                    idempotency="required", agent=Agent(confirm=True))  # fmt: skip
    def send(ctx, invoice, _):
        """Send it to the customer."""
        return ctx.external("mail", lambda key: key)

    (tool,) = charter.tools(ada_for(ALICE, {"*"}))
    assert {"title": "invoice.send", "readOnlyHint": False, "destructiveHint": True,
            "idempotentHint": True, "openWorldHint": True} == tool.annotations  # fmt: skip
    schema = tool.input_schema
    assert ["purpose", "target", "idempotency_key"] == schema["required"]
    assert schema["additionalProperties"] is False
    assert {"integer"} == {schema["properties"]["target"]["type"]}


def test_the_input_schema_wraps_the_input_model_with_target_and_purpose(charter):
    tools = {t.name: t for t in charter.tools(ada_for(ALICE))}
    create = tools["invoice.create"].input_schema
    assert ["purpose", "input"] == create["required"]  # no target: it creates
    assert {"customer", "amount"} <= set(create["properties"]["input"]["required"])
    assert create["properties"]["input"]["additionalProperties"] is False
    assert "target" in tools["invoice.submit"].input_schema["required"]
    assert "idempotency_key" in create["properties"]  # optional key: not required


def test_exposure_declarations_are_checked_at_start_up():
    charter = Charter(database_url="sqlite://", development=True)
    for bad in ("yes", Agent(expires=timedelta(seconds=1)), Agent(approvers={"boss"})):
        with pytest.raises(ConfigurationError):
            charter.action(f"x.a{abs(hash(repr(bad))) % 1000}", agent=bad)(lambda c, r, d: None)


# -- calls through the gate ---------------------------------------------------------------------


def test_a_call_runs_through_the_gate_on_channel_agent_audited_with_both_identities(
    charter, agents
):
    invoice = draft(agents)
    result = agents.call(ada_for(ALICE), "invoice.submit",
                         {"purpose": PURPOSE, "target": invoice})  # fmt: skip
    assert "ok" == result.status
    assert "submitted" == result.body["state"]
    (entry,) = entries(charter, "invoice.submit")
    assert ("agent", "alice", "ada", PURPOSE, "allow", "ok") == (
        entry.channel, entry.subject, entry.real_actor, entry.reason, entry.decision,
        entry.outcome,
    )  # fmt: skip
    assert "alice" == result.body["submitted_by"]  # the user's own permissions applied


def test_a_call_the_rules_deny_is_refused_and_audited(charter, agents):
    invoice = draft(agents, ALICE)
    with pytest.raises(Forbidden):  # bob may not submit alice's invoice; ada for bob neither
        agents.call(ada_for(BOB), "invoice.submit", {"purpose": PURPOSE, "target": invoice})
    (entry,) = entries(charter, "invoice.submit")
    assert ("deny", "bob", "ada", "agent") == (
        entry.decision,
        entry.subject,
        entry.real_actor,
        entry.channel,
    )


def test_an_unexposed_action_is_no_tool_even_when_the_user_could_run_it(charter, agents):
    invoice = draft(agents)
    for name in ("invoice.approve", "invoice.pay", "nope.nope"):
        with pytest.raises(UnknownAction):
            agents.call(ada_for(BOB), name, {"purpose": PURPOSE, "target": invoice})
    assert [] == entries(charter, "invoice.approve")


def test_the_purpose_is_required_and_arguments_are_bounded(agents):
    for arguments in (
        {"input": {"customer": "A", "amount": 1}},
        {"purpose": "  ", "input": {"customer": "A", "amount": 1}},
        {"purpose": "x" * 501, "input": {"customer": "A", "amount": 1}},
        {"purpose": PURPOSE, "input": {"customer": "A", "amount": 1}, "as": "carol"},
        {"purpose": PURPOSE, "input": {"customer": "A", "amount": 1, "state": "paid"}},
        {"purpose": PURPOSE, "input": {"customer": "A" * 70_000, "amount": 1}},
        ["not", "an", "object"],
    ):
        with pytest.raises(InvalidInput):
            agents.call(ada_for(ALICE), "invoice.create", arguments)


def test_a_plain_actor_cannot_call_tools(agents):
    with pytest.raises(Unauthenticated):
        agents.call(ALICE, "invoice.create", {"purpose": PURPOSE})


def test_hidden_fields_never_reach_the_agent(agents):
    iban = "DE44500105175407324931"
    created = agents.call(ada_for(ALICE), "invoice.create", {
        "purpose": PURPOSE,
        "input": {"customer": "ACME", "amount": "10", "bank_account": iban}})  # fmt: skip
    assert "bank_account" not in created.body
    read = agents.call(ada_for(ALICE), "invoice.get",
                       {"purpose": PURPOSE, "target": created.body["id"]})  # fmt: skip
    assert "bank_account" not in read.body
    assert iban not in repr(read.as_json())


# -- agent tokens --------------------------------------------------------------------------------


def test_an_agent_token_authenticates_the_agent_for_its_user_and_nothing_else(agents):
    token = agents.issue(ADA, ALICE, scopes=SCOPES)
    actor = agents.authenticate(token)
    assert ("ada", "alice", frozenset(SCOPES)) == (actor.id, actor.subject.id, actor.scopes)
    signer = TokenSigner([SECRET])
    with pytest.raises(Unauthenticated):  # not accepted by the HTTP API's authentication
        signer.authenticate(f"Bearer {token}", directory)
    with pytest.raises(Unauthenticated):  # a user's ordinary token is not an agent's
        agents.authenticate(signer.issue("alice", "acme", scopes=SCOPES))
    with pytest.raises(Unauthenticated):  # sam is support, not an agent
        agents.authenticate(signer.issue("alice", "acme", audience="charter:agent", act="sam"))
    with pytest.raises(Unauthenticated):
        agents.authenticate(TokenSigner(["another-secret-0123456789abcdef0123456789"]).issue(
            "alice", "acme", audience="charter:agent", act="ada"))  # fmt: skip
    with pytest.raises(Unauthenticated):
        agents.authenticate(None)


# -- confirmation ---------------------------------------------------------------------------------


def ask_void(agents: AgentChannel, invoice: int) -> str:
    result = agents.call(ada_for(ALICE), "invoice.void", {"purpose": PURPOSE, "target": invoice})
    assert "pending_confirmation" == result.status
    return str(result.body["id"])


def test_a_confirmed_tool_leaves_a_pending_request_and_runs_only_when_approved(charter, agents):
    invoice = draft(agents)
    pending = ask_void(agents, invoice)
    assert [] == [e for e in entries(charter, "invoice.void") if e.outcome == "ok"]
    assert [pending] == [p.id for p in agents.pending(ALICE)]
    outcome = agents.approve(ALICE, pending)
    assert "void" == outcome.body["state"]
    assert ConfirmationState.EXECUTED == agents.get(ALICE, pending).state
    trail = [
        (e.outcome, e.subject, e.real_actor, e.channel) for e in entries(charter, "invoice.void")
    ]
    assert [
        ("confirmation_pending", "alice", "ada", "agent"),
        ("confirmation_approved", "alice", None, "http"),
        ("ok", "alice", "ada", "agent"),
    ] == trail  # fmt: skip
    assert {PURPOSE} == {e.reason for e in entries(charter, "invoice.void") if e.channel == "agent"}
    with pytest.raises(ConfirmationNotPending):
        agents.approve(ALICE, pending)  # once


def test_the_agent_itself_and_other_people_cannot_approve(charter, agents):
    pending = ask_void(agents, draft(agents))
    for who in (ADA, ada_for(ALICE), SAM.impersonate(ALICE), BOB):
        with pytest.raises(ConfirmationForbidden):
            agents.approve(who, pending)
    other = Actor.make("alice", "globex", roles={"member"})
    with pytest.raises(Exception, match="not found"):
        agents.approve(other, pending)  # another tenant's request does not exist for them
    assert ConfirmationState.PENDING == agents.get(ALICE, pending).state
    refused = [e for e in entries(charter, "invoice.void") if e.outcome == "confirmation_forbidden"]
    assert 4 == len(refused)


def test_a_person_whose_credential_lacks_the_actions_scope_cannot_decide_it(charter, agents):
    """Approving or rejecting needs the action's scope, as running it would: none, nothing."""
    pending = ask_void(agents, draft(agents))
    for scopes in (set(), {"invoices:read"}):  # invoice.void needs invoices:write
        token = Actor.make("alice", "acme", roles=ALICE.roles, scopes=scopes)
        with pytest.raises(ConfirmationForbidden, match="invoices:write"):
            agents.approve(token, pending)
        with pytest.raises(ConfirmationForbidden, match="invoices:write"):
            agents.reject(token, pending)
        assert [] == agents.pending(token)
    assert ConfirmationState.PENDING == agents.get(ALICE, pending).state
    refused = [e for e in entries(charter, "invoice.void") if e.outcome == "confirmation_forbidden"]
    assert [("deny", "scope", "alice")] * 4 == [(e.decision, e.rule, e.subject) for e in refused]
    assert [] == [e for e in entries(charter, "invoice.void") if e.outcome == "ok"]
    scoped = Actor.make("alice", "acme", roles=ALICE.roles, scopes={"invoices:write"})
    assert "void" == agents.approve(scoped, pending).body["state"]


def test_an_expired_request_is_refused(charter, agents, clock):
    pending = ask_void(agents, draft(agents))
    clock.advance(timedelta(hours=24))
    with pytest.raises(ConfirmationExpired):
        agents.approve(ALICE, pending)
    assert ConfirmationState.EXPIRED == agents.get(ALICE, pending).state
    assert [] == agents.pending(ALICE)
    assert [] == [e for e in entries(charter, "invoice.void") if e.outcome == "ok"]


def test_the_action_is_decided_again_when_approved(charter, agents):
    invoice = draft(agents)
    pending = ask_void(agents, invoice)
    agents.call(ada_for(ALICE), "invoice.submit", {"purpose": PURPOSE, "target": invoice})
    carol_voids = charter.execute(CAROL, "invoice.void", target=invoice, reason="duplicate")
    assert "void" == carol_voids.body["state"]
    with pytest.raises(InvalidTransition) as refused:  # void is no longer possible: 409
        agents.approve(ALICE, pending)
    assert "invalid_transition" == refused.value.code
    assert ConfirmationState.FAILED == agents.get(ALICE, pending).state


def test_a_rejected_request_never_runs(charter, agents):
    pending = ask_void(agents, draft(agents))
    assert ConfirmationState.REJECTED == agents.reject(ALICE, pending).state
    with pytest.raises(ConfirmationNotPending):
        agents.approve(ALICE, pending)


def test_a_request_the_credential_cannot_reach_is_refused_before_it_waits(charter, agents):
    invoice = draft(agents)
    with pytest.raises(Forbidden):
        agents.call(ada_for(ALICE, {"invoices:read"}), "invoice.void",
                    {"purpose": PURPOSE, "target": invoice})  # fmt: skip
    assert [] == agents.pending(ALICE)
    (entry,) = entries(charter, "invoice.void")
    assert ("deny", "forbidden") == (entry.decision, entry.outcome)


def test_fiona_is_out_of_the_grant_so_her_agent_gets_nothing(charter, agents):
    assert () == charter.tools(ada_for(FIONA))  # finance is not among of_roles
    with pytest.raises(Forbidden):
        agents.call(ada_for(FIONA), "invoice.create", {"purpose": PURPOSE,
                    "input": {"customer": "A", "amount": 1}})  # fmt: skip


# -- the reference service's confirmation routes ---------------------------------------------------


def test_a_person_confirms_over_http_and_the_agent_cannot(database_url, clock):
    from fastapi.testclient import TestClient

    from charter.demo.app import create_app, demo_scopes
    from charter.settings import DEVELOPMENT_TOKEN_SECRET, Settings

    settings = Settings(environment="development", token_secrets=(DEVELOPMENT_TOKEN_SECRET,),
                        audit_keys=AUDIT_KEYS)  # fmt: skip
    app = create_app(settings, charter=Charter(database_url=database_url, audit_keys=AUDIT_KEYS,
                                               clock=clock))  # fmt: skip
    signer = TokenSigner([DEVELOPMENT_TOKEN_SECRET])

    def bearer(who: Actor) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {signer.issue(who.id, who.tenant, scopes=demo_scopes(who))}"
        }

    with TestClient(app, raise_server_exceptions=False) as client:
        agents: AgentChannel = app.state.agents
        pending = ask_void(agents, draft(agents))
        listed = client.get("/agent/confirmations", headers=bearer(ALICE))
        assert [pending] == [p["id"] for p in listed.json()["items"]]
        assert [] == client.get("/agent/confirmations", headers=bearer(BOB)).json()["items"]
        refused = client.post(f"/agent/confirmations/{pending}/approve", headers=bearer(ADA))
        assert (403, "confirmation_forbidden") == (refused.status_code, refused.json()["code"])
        assert 401 == client.post(f"/agent/confirmations/{pending}/approve").status_code
        approved = client.post(f"/agent/confirmations/{pending}/approve", headers=bearer(ALICE))
        assert (200, "void") == (approved.status_code, approved.json()["state"])
        # The action's own answer, headers included (as POST /invoices/{id}/void sends them).
        assert ("no-store", '"2"') == (approved.headers["Cache-Control"], approved.headers["ETag"])
        assert '"write";q=300;w=60' == approved.headers["RateLimit-Policy"]
        again = client.post(f"/agent/confirmations/{pending}/approve", headers=bearer(ALICE))
        assert 409 == again.status_code


def test_concurrent_approvals_run_the_action_exactly_once(charter, agents):
    import threading

    pending = ask_void(agents, draft(agents))
    barrier, results = threading.Barrier(4), []

    def approve() -> None:
        barrier.wait()
        try:
            results.append(agents.approve(ALICE, pending).body["state"])
        except ConfirmationNotPending as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=approve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ["confirmation_not_pending"] * 3 + ["void"] == sorted(results)
    assert 1 == len([e for e in entries(charter, "invoice.void") if e.outcome == "ok"])
