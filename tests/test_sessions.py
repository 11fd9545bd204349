"""charter.sessions as a library and from the CLI: open, act, revoke, list (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from charter import Charter
from charter.audit import audit_table
from charter.cli import app
from charter.demo.service import DEMO_USERS, build_charter, directory
from charter.errors import (
    ConfigurationError,
    Forbidden,
    InvalidInput,
    ReasonRequired,
    Unauthenticated,
)
from charter.sessions import ImpersonationSessions
from charter.settings import DEVELOPMENT_TOKEN_SECRET
from charter.testing import FrozenClock
from charter.tokens import TokenSigner

AUDIT_KEYS = {"k1": "test-audit-key-0123456789abcdef"}
SAM = DEMO_USERS[("acme", "sam")].__class__.make(
    "sam", "acme", kind="support", roles={"support"}, scopes={"invoices:*", "support:sessions"}
)
CAROL = DEMO_USERS[("acme", "carol")]
WHY = "ticket #4411"


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def demo(database_url, clock, disposing):
    charter = disposing(Charter(database_url=database_url, audit_keys=AUDIT_KEYS, clock=clock))
    build_charter(charter)
    sessions = ImpersonationSessions.of(charter)
    sessions.signer = TokenSigner([DEVELOPMENT_TOKEN_SECRET])
    return charter, sessions


def authenticate(signer: TokenSigner, token: str, sessions: ImpersonationSessions):
    return signer.authenticate(f"Bearer {token}", directory, sessions=sessions)


def test_the_library_round_trip(demo, clock):
    charter, sessions = demo
    opened = sessions.open(SAM, "alice", reason=WHY)
    assert opened.token is not None
    assert "token" not in opened.session
    actor = authenticate(sessions.signer, opened.token, sessions)
    assert ("sam", "alice", opened.id) == (actor.id, actor.subject.id, actor.session)
    assert frozenset({"invoices:read", "invoices:write"}) == actor.scopes
    created = charter.execute(actor, "invoice.create", {"customer": "ACME", "amount": "5"},
                              reason=WHY)  # fmt: skip
    assert 201 == created.status
    sessions.revoke(CAROL, opened.id, reason="done")
    with pytest.raises(Unauthenticated, match="revoked"):
        authenticate(sessions.signer, opened.token, sessions)
    assert not sessions.is_active(session=opened.id, tenant="acme", actor="sam", subject="alice")
    (mine,), _ = sessions.mine(DEMO_USERS[("acme", "alice")])
    assert ["invoice.create"] == [a["action"] for a in mine["actions"]]


def test_lists_and_exports_on_someones_behalf_need_a_reason_and_record_it(demo):
    """As a single read does (found by an attack run: a support user listed and exported a
    customer's invoices with no reason in the trail)."""
    charter, sessions = demo
    opened = sessions.open(SAM, "alice", reason=WHY)
    actor = authenticate(sessions.signer, opened.token, sessions)
    with pytest.raises(ReasonRequired):
        charter.list_records(actor, "invoice.get")
    with pytest.raises(ReasonRequired):
        charter.export(actor, "invoice.export")
    charter.list_records(actor, "invoice.get", reason="ticket 4711: wrong totals")
    with charter.export(actor, "invoice.export", reason="ticket 4711: wrong totals") as stream:
        b"".join(stream)
    a = audit_table.c
    with charter.engine.connect() as conn:
        rows = conn.execute(
            select(a.action, a.outcome, a.real_actor, a.reason).where(a.real_actor == "sam")
        ).all()
    listed = {(r.action, r.reason) for r in rows if r.action in ("invoice.get", "invoice.export")}
    assert {("invoice.get", "ticket 4711: wrong totals"),
            ("invoice.export", "ticket 4711: wrong totals")} == listed  # fmt: skip


def test_refusals_of_opening(demo):
    _, sessions = demo
    with pytest.raises(Forbidden):
        sessions.open(SAM, "carol", reason=WHY)  # an admin: no grant reaches her
    with pytest.raises(Forbidden):
        sessions.open(SAM, "gina", reason=WHY)  # another tenant's user
    with pytest.raises(Forbidden):
        sessions.open(SAM, "sam", reason=WHY)  # oneself
    with pytest.raises(ReasonRequired):
        sessions.open(SAM, "alice", reason="  ")
    with pytest.raises(InvalidInput):
        sessions.open(SAM, "alice", reason=WHY, minutes=121)


def test_a_session_is_checked_against_the_clock_at_every_call(demo, clock):
    _, sessions = demo
    opened = sessions.open(SAM, "alice", reason=WHY, minutes=1)
    who = {"session": opened.id, "tenant": "acme", "actor": "sam", "subject": "alice"}
    sessions.check(**who)
    clock.advance(timedelta(seconds=59))
    sessions.check(**who)
    clock.advance(timedelta(seconds=1))
    with pytest.raises(Unauthenticated, match="expired"):
        sessions.check(**who)
    for other in ({"tenant": "globex"}, {"actor": "carol"}, {"subject": "bob"},
                  {"session": "0" * 32}):  # fmt: skip
        with pytest.raises(Unauthenticated, match="not valid"):
            sessions.check(**{**who, **other})


def test_a_charter_declares_sessions_once(demo):
    charter, _ = demo
    with pytest.raises(ConfigurationError):
        ImpersonationSessions(charter, directory=directory)
    with pytest.raises(ConfigurationError):
        ImpersonationSessions.of(Charter(database_url="sqlite://", development=True))


@pytest.mark.parametrize(
    "options",
    [
        {"length": timedelta(seconds=30)},
        {"max_length": timedelta(minutes=90, seconds=1)},
        {"length": timedelta(hours=3)},
        {"managers": ()},
    ],
)
def test_bad_configuration_is_refused_at_start_up(options):
    charter = Charter(database_url="sqlite://", development=True)
    with pytest.raises(ConfigurationError):
        ImpersonationSessions(charter, directory=directory, **options)


def test_the_cli_lists_and_revokes_through_the_gate(demo, database_url, monkeypatch, tmp_path):
    charter, sessions = demo
    monkeypatch.setenv("CHARTER_ENV", "development")
    monkeypatch.setenv("CHARTER_AUDIT_KEY", AUDIT_KEYS["k1"])
    operators = tmp_path / "operators.json"
    operators.write_text(
        '{"olga": {"tenant": "acme", "roles": ["operator"], "scopes": ["support:sessions"]}}'
    )
    monkeypatch.setenv("CHARTER_OPERATORS", str(operators))
    opened = sessions.open(SAM, "alice", reason=WHY)
    runner = CliRunner()
    base = ["--demo", "--database-url", database_url]
    listed = runner.invoke(app, ["support", "sessions", "list", "--json", *base])
    assert 0 == listed.exit_code, listed.output
    assert [opened.id] == [json.loads(line)["id"] for line in listed.output.splitlines()]
    no_reason = runner.invoke(app, ["support", "sessions", "revoke", opened.id, *base])
    assert 0 != no_reason.exit_code
    revoked = runner.invoke(app, ["support", "sessions", "revoke", opened.id, "--reason",
                                  "security review", "--as", "olga", *base])  # fmt: skip
    assert 0 == revoked.exit_code, revoked.output
    assert "revoked by olga" in revoked.output
    with pytest.raises(Unauthenticated):
        authenticate(sessions.signer, opened.token or "", sessions)
    with charter.engine.connect() as conn:
        entry = conn.execute(
            select(audit_table).where(audit_table.c.action == "support.session.revoke")
        ).one()
    assert ("olga", "cli", "security review") == (entry.subject, entry.channel, entry.reason)
    missing = runner.invoke(app, ["support", "sessions", "revoke", "nope", "--reason", "x",
                                  "--as", "olga", *base])  # fmt: skip
    assert 1 == missing.exit_code
