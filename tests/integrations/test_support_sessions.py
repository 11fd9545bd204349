"""Support impersonation sessions over HTTP, on the reference service (issue 12, item 5).

sam (support) opens a session for alice, acts with its token, alice sees who acted
for her, and a revocation stops the token at the next request.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from charter import Charter
from charter.audit.entry import audit_table
from charter.demo.app import create_app, demo_scopes
from charter.demo.service import DEMO_USERS
from charter.errors import Unauthenticated
from charter.sessions import ImpersonationSessions
from charter.settings import DEVELOPMENT_TOKEN_SECRET, Settings
from charter.testing import FrozenClock
from charter.tokens import TokenSigner

SETTINGS = Settings(
    environment="development",
    token_secrets=(DEVELOPMENT_TOKEN_SECRET,),
    audit_keys={"k1": "test-audit-key-0123456789abcdef"},
)
REASON = {"X-Charter-Reason": "ticket #4411: invoice stuck in draft"}


@pytest.fixture
def clock() -> FrozenClock:
    # Now, to the second: the tokens' own clock is the wall clock.
    return FrozenClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def client(database_url: str, clock: FrozenClock) -> Iterator[TestClient]:
    charter = Charter(database_url=database_url, audit_keys=SETTINGS.audit_keys, clock=clock)
    app = create_app(SETTINGS, charter=charter)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.app_state = app.state  # type: ignore[attr-defined]
        yield c


def auth(user: str, **headers: str) -> dict[str, str]:
    actor = next(a for (_, uid), a in DEMO_USERS.items() if uid == user)
    token = TokenSigner([DEVELOPMENT_TOKEN_SECRET]).issue(
        actor.id, actor.tenant, scopes=demo_scopes(actor)
    )
    return {"Authorization": f"Bearer {token}", **headers}


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def open_session(client: TestClient, user: str = "alice", **body: Any) -> dict[str, Any]:
    response = client.post("/support/sessions", json={"user": user, **body},
                           headers=auth("sam", **REASON))  # fmt: skip
    assert 201 == response.status_code, response.text
    return dict(response.json())


def entries(client: TestClient, action: str | None = None) -> list[Any]:
    charter: Charter = client.app_state.charter  # type: ignore[attr-defined]
    stmt = select(audit_table).order_by(audit_table.c.id)
    if action is not None:
        stmt = stmt.where(audit_table.c.action == action)
    with charter.engine.connect() as conn:
        return list(conn.execute(stmt))


def create_invoice(client: TestClient, headers: dict[str, str]) -> Any:
    return client.post("/invoices", json={"customer": "ACME", "amount": "10.00"}, headers=headers)


def test_a_plain_token_cannot_claim_to_act_for_someone_outside_a_session(client):
    """The attack: sam opened a session for alice, carol revoked it, and sam went on acting for
    alice with his own token and X-On-Behalf-Of: no time limit, nothing to revoke, and alice's
    GET /me/impersonations did not list it. The reference service now refuses the claim."""
    opened = open_session(client)
    revoked = client.post(f"/support/sessions/{opened['id']}/revoke",
                          json={}, headers=auth("carol", **REASON))  # fmt: skip
    assert 200 == revoked.status_code, revoked.text
    claimed = create_invoice(client, auth("sam", **REASON, **{"X-On-Behalf-Of": "alice"}))
    assert (401, "unauthenticated") == (claimed.status_code, claimed.json()["code"])
    assert "impersonation session" in claimed.json()["detail"]
    assert [] == entries(client, "invoice.create")  # nothing ran, for alice or anyone


# -- opening ---------------------------------------------------------------------------


def test_opening_without_a_grant_is_refused_and_audited(client):
    # The demo's grant covers members and approvers, never an admin (carol).
    refused = client.post(
        "/support/sessions", json={"user": "carol"}, headers=auth("sam", **REASON)
    )
    assert 403 == refused.status_code, refused.text
    assert "forbidden" == refused.json()["code"]
    # A user who does not exist is refused exactly alike: ids are not enumerated.
    missing = client.post("/support/sessions", json={"user": "zed"}, headers=auth("sam", **REASON))
    assert (403, refused.json()["detail"]) == (missing.status_code, missing.json()["detail"])
    denied = entries(client, "support.session.open")
    assert [("deny", "sam")] * 2 == [(e.decision, e.subject) for e in denied]
    assert {"impersonation-grant"} == {e.rule for e in denied}


def test_only_a_support_role_a_grant_names_may_open(client):
    # alice holds no support role: no grant has her as `by` (and her token lacks the scope).
    response = client.post(
        "/support/sessions", json={"user": "bob"}, headers=auth("alice", **REASON)
    )
    assert 403 == response.status_code


def test_opening_needs_a_reason(client):
    response = client.post("/support/sessions", json={"user": "alice"}, headers=auth("sam"))
    assert (400, "reason_required") == (response.status_code, response.json()["code"])


def test_a_session_lasts_30_minutes_by_default_and_at_most_the_maximum(client, clock):
    opened = open_session(client)
    assert clock() + timedelta(minutes=30) == datetime.fromisoformat(opened["expires_at"])
    longest = open_session(client, minutes=120)
    assert clock() + timedelta(hours=2) == datetime.fromisoformat(longest["expires_at"])
    too_long = client.post("/support/sessions", json={"user": "alice", "minutes": 121},
                           headers=auth("sam", **REASON))  # fmt: skip
    assert (422, "invalid_input") == (too_long.status_code, too_long.json()["code"])
    for bad in (0, -5, "30", True, 30.5):
        r = client.post("/support/sessions", json={"user": "alice", "minutes": bad},
                        headers=auth("sam", **REASON))  # fmt: skip
        assert 422 == r.status_code, bad


def test_the_maximum_is_configurable(database_url):
    charter = Charter(database_url=database_url, audit_keys=SETTINGS.audit_keys)
    try:
        sessions = ImpersonationSessions(charter, directory=lambda t, u: None,
                                         max_length=timedelta(minutes=45))  # fmt: skip
        assert 45 == sessions.open_input.model_fields["minutes"].metadata[-1].le
        assert timedelta(minutes=45) == sessions.max_length
    finally:
        charter.close()


def test_the_token_carries_the_act_claim_and_the_session_id(client):
    opened = open_session(client)
    claims = jwt.decode(opened["token"], options={"verify_signature": False})
    assert {"sub": "sam"} == claims["act"]  # RFC 8693 section 4.1: who really acts
    assert ("alice", "acme", opened["id"]) == (claims["sub"], claims["tenant"], claims["sid"])
    # Narrowed by the grant: sam's own token has invoices:* and support:sessions.
    assert "invoices:read invoices:write" == claims["scope"]
    assert int(datetime.fromisoformat(opened["expires_at"]).timestamp()) == claims["exp"]
    assert ["invoices:read", "invoices:write"] == opened["scopes"]
    assert ["support-for-staff"] == opened["grants"]


# -- acting ------------------------------------------------------------------------------


def test_acting_within_the_grant_is_allowed_and_outside_it_refused(client):
    opened = open_session(client, user="bob")  # bob is an approver
    token = opened["token"]
    created = create_invoice(client, bearer(token, **REASON))
    assert 201 == created.status_code, created.text
    assert "bob" == created.json()["created_by"]
    # Approving needs invoices:approve, which the grant does not give.
    other = create_invoice(client, auth("alice")).json()["id"]
    assert 200 == client.post(f"/invoices/{other}/submit", headers=auth("alice")).status_code
    approve = client.post(f"/invoices/{other}/approve", json={}, headers=bearer(token, **REASON))
    assert 403 == approve.status_code, approve.text
    (denial,) = [e for e in entries(client, "invoice.approve") if e.decision == "deny"]
    assert ("impersonation-grant", "sam", "bob") == (denial.rule, denial.real_actor, denial.subject)


def test_actions_declared_impersonation_false_refuse_a_session(client):
    token = open_session(client)["token"]
    invoice = create_invoice(client, auth("alice")).json()["id"]
    reminded = client.post(
        f"/invoices/{invoice}/remind", headers=bearer(token, **REASON, **{"Idempotency-Key": "r1"})
    )
    assert 403 == reminded.status_code, reminded.text
    # The session's own actions refuse it too: a session cannot open another one.
    nested = client.post("/support/sessions", json={"user": "bob"}, headers=bearer(token, **REASON))
    assert 403 == nested.status_code


def test_every_action_under_a_session_is_audited_with_both_people_and_the_session(client):
    opened = open_session(client)
    assert 201 == create_invoice(client, bearer(opened["token"], **REASON)).status_code
    (entry,) = entries(client, "invoice.create")
    assert ("alice", "sam", "acme") == (entry.subject, entry.real_actor, entry.tenant)
    assert opened["id"] == entry.detail["session"]
    assert REASON["X-Charter-Reason"] == entry.reason
    assert client.app_state.charter.verify_audit().ok


def test_opening_and_closing_are_audited_through_the_gate(client):
    opened = open_session(client)
    closed = client.post(f"/support/sessions/{opened['id']}/close", headers=auth("sam"))
    assert 200 == closed.status_code, closed.text
    assert ("closed", "sam") == (closed.json()["state"], closed.json()["ended_by"])
    (open_entry,) = entries(client, "support.session.open")
    (close_entry,) = entries(client, "support.session.close")
    assert ("allow", "sam", "impersonation_sessions", opened["id"]) == (
        open_entry.decision, open_entry.subject, open_entry.resource_type, open_entry.resource_id
    )  # fmt: skip
    assert REASON["X-Charter-Reason"] == open_entry.reason
    assert ("open", "closed") == (close_entry.state_before, close_entry.state_after)
    assert opened["id"] == close_entry.resource_id
    # Closed once: closing again is not possible in that state.
    again = client.post(f"/support/sessions/{opened['id']}/close", headers=auth("sam"))
    assert (409, "invalid_transition") == (again.status_code, again.json()["code"])
    # And the token is refused from now on.
    assert 401 == create_invoice(client, bearer(opened["token"], **REASON)).status_code


# -- revocation and expiry ---------------------------------------------------------------


def test_a_revoked_session_is_refused_at_the_next_request(client, clock):
    opened = open_session(client)  # 10:00
    token = opened["token"]
    clock.advance(timedelta(minutes=2))  # 10:02
    assert 201 == create_invoice(client, bearer(token, **REASON)).status_code
    clock.advance(timedelta(minutes=3))  # 10:05, by an admin
    why = {"X-Charter-Reason": "left the ticket open"}
    revoked = client.post(f"/support/sessions/{opened['id']}/revoke", headers=auth("carol", **why))
    assert 200 == revoked.status_code, revoked.text
    assert ("revoked", "carol") == (revoked.json()["state"], revoked.json()["ended_by"])
    clock.advance(timedelta(seconds=1))  # 10:05:01
    refused = create_invoice(client, bearer(token, **REASON))
    assert (401, "unauthenticated") == (refused.status_code, refused.json()["code"])
    assert "revoked" in refused.json()["detail"]
    assert 'Bearer error="invalid_token"' == refused.headers["www-authenticate"]
    (entry,) = entries(client, "support.session.revoke")
    assert ("carol", "left the ticket open", "open", "revoked") == (
        entry.subject, entry.reason, entry.state_before, entry.state_after
    )  # fmt: skip


def test_revoking_needs_a_reason_and_a_right(client):
    opened = open_session(client)
    no_reason = client.post(f"/support/sessions/{opened['id']}/revoke", headers=auth("carol"))
    assert 400 == no_reason.status_code
    # bob is neither the session's support user nor a manager; his token lacks the scope too.
    bob = client.post(f"/support/sessions/{opened['id']}/revoke", headers=auth("bob", **REASON))
    assert bob.status_code in (403, 404)
    # Another tenant's admin does not even see it.
    assert 200 == client.get(f"/support/sessions/{opened['id']}", headers=auth("sam")).status_code
    missing = client.post("/support/sessions/nosuchsession/revoke", headers=auth("carol", **REASON))
    assert 404 == missing.status_code


def test_an_expired_session_is_refused_before_its_token_would_be(client, clock):
    opened = open_session(client, minutes=5)
    token = opened["token"]
    clock.advance(timedelta(minutes=4, seconds=59))
    assert 201 == create_invoice(client, bearer(token, **REASON)).status_code
    clock.advance(timedelta(seconds=1))  # the session's end, by Charter's clock
    refused = create_invoice(client, bearer(token, **REASON))
    assert (401, "unauthenticated") == (refused.status_code, refused.json()["code"])
    assert "expired" in refused.json()["detail"]
    listed = client.get("/support/sessions", headers=auth("sam")).json()["items"]
    assert ["expired"] == [s["status"] for s in listed]


# -- listing and the user's view -----------------------------------------------------------


def test_sessions_are_listed_for_their_support_user_and_managers_only(client):
    opened = open_session(client)
    assert [opened["id"]] == [
        s["id"] for s in client.get("/support/sessions", headers=auth("sam")).json()["items"]
    ]
    assert [opened["id"]] == [
        s["id"] for s in client.get("/support/sessions", headers=auth("carol")).json()["items"]
    ]
    assert 403 == client.get("/support/sessions", headers=auth("alice")).status_code  # no scope
    assert [] == client.get("/support/sessions", headers=auth("gina")).json().get("items", [])


def test_a_user_sees_who_acted_on_their_behalf_and_when(client, clock):
    opened = open_session(client)
    clock.advance(timedelta(minutes=2))
    created = create_invoice(client, bearer(opened["token"], **REASON)).json()
    # alice's own action and bob's are not under the session.
    assert 201 == create_invoice(client, auth("alice")).status_code
    mine = client.get("/me/impersonations", headers=auth("alice"))
    assert 200 == mine.status_code, mine.text
    (session,) = mine.json()["items"]
    assert ("sam", opened["id"], opened["reason"]) == (
        session["support"], session["id"], session["reason"]
    )  # fmt: skip
    assert [("invoice.create", str(created["id"]), "allow")] == [
        (a["action"], a["resource_id"], a["decision"]) for a in session["actions"]
    ]
    assert (clock()).isoformat() == session["actions"][0]["at"]
    # Nobody else's sessions: bob has none, and sam's own view as a user is empty.
    assert [] == client.get("/me/impersonations", headers=auth("bob")).json()["items"]
    # A session token cannot read alice's impersonation history.
    as_alice = client.get("/me/impersonations", headers=bearer(opened["token"], **REASON))
    assert 403 == as_alice.status_code


def test_my_impersonations_carry_the_ratelimit_fields_of_the_read_that_counted_them(client):
    first, second = (client.get("/me/impersonations", headers=auth("alice")) for _ in range(2))
    assert ['"read";q=600;w=60'] * 2 == [r.headers["RateLimit-Policy"] for r in (first, second)]
    remaining = [int(r.headers["RateLimit"].split(";r=")[1].split(";")[0]) for r in (first, second)]
    assert remaining[0] - 1 == remaining[1]  # each counted once, like any list's page


# -- tokens --------------------------------------------------------------------------------


def _tamper(token: str, **claims: Any) -> str:
    head, body, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(claims)
    raw = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"{head}.{raw}.{signature}"


def test_a_tampered_token_is_refused(client):
    opened = open_session(client)
    token = opened["token"]
    for changed in (_tamper(token, act={"sub": "carol"}), _tamper(token, sid="x" * 32),
                    _tamper(token, scope="*")):  # fmt: skip
        assert 401 == create_invoice(client, bearer(changed, **REASON)).status_code
    # Signed with the real key but naming another support user: the session says otherwise.
    forged = TokenSigner([DEVELOPMENT_TOKEN_SECRET]).issue(
        "alice", "acme", scopes=["invoices:write"], act="carol", session=opened["id"]
    )
    refused = create_invoice(client, bearer(forged, **REASON))
    assert (401, "The impersonation session is not valid.") == (
        refused.status_code, refused.json()["detail"]
    )  # fmt: skip
    nested = TokenSigner([DEVELOPMENT_TOKEN_SECRET]).issue(
        "alice", "acme", scopes=["invoices:write"], act="sam", session=opened["id"]
    )
    nested = _tamper(nested, act={"sub": "sam", "act": {"sub": "eve"}})
    assert 401 == create_invoice(client, bearer(nested, **REASON)).status_code


def test_a_session_token_cannot_also_claim_on_behalf_of_someone(client):
    token = open_session(client)["token"]
    both = bearer(token, **REASON, **{"X-On-Behalf-Of": "bob"})
    assert 401 == create_invoice(client, both).status_code


def test_a_session_token_is_refused_where_sessions_are_not_checked():
    signer = TokenSigner([DEVELOPMENT_TOKEN_SECRET])
    token = signer.issue("alice", "acme", scopes=["invoices:write"], act="sam", session="s1")
    with pytest.raises(Unauthenticated):
        signer.authenticate(f"Bearer {token}", lambda t, u: DEMO_USERS.get((t, u)))


def test_a_session_ends_when_its_support_user_loses_the_grant(client, monkeypatch):
    opened = open_session(client)
    import charter.demo.service as service

    demoted = dict(service.DEMO_USERS)
    demoted[("acme", "sam")] = service.Actor.make("sam", "acme", kind="support", roles=set())
    monkeypatch.setattr(service, "DEMO_USERS", demoted)
    refused = create_invoice(client, bearer(opened["token"], **REASON))
    assert 403 == refused.status_code  # the grant is decided again at every call
