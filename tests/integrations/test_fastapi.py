"""The HTTP slice end to end: token → action → outcome or RFC 9457 problem."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from charter import Charter
from charter.demo.app import create_app, demo_scopes
from charter.demo.models import Invoice
from charter.demo.service import DEMO_USERS
from charter.errors import ConfigurationError
from charter.idempotency import IdempotencyKeyInvalid
from charter.settings import DEVELOPMENT_TOKEN_SECRET, Settings
from charter.tokens import TokenSigner

SETTINGS = Settings(
    environment="development",
    token_secrets=(DEVELOPMENT_TOKEN_SECRET,),
    audit_keys={"k1": "test-audit-key-0123456789abcdef"},
)
PROBLEM = "application/problem+json"


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    charter = Charter(database_url=database_url, audit_keys=SETTINGS.audit_keys)
    app = create_app(SETTINGS, charter=charter)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.app_state = app.state  # type: ignore[attr-defined]
        yield c


def auth(user: str, *, scopes: list[str] | None = None, **headers: str) -> dict[str, str]:
    actor = next(a for (_, uid), a in DEMO_USERS.items() if uid == user)
    token = TokenSigner([DEVELOPMENT_TOKEN_SECRET]).issue(
        actor.id, actor.tenant, scopes=demo_scopes(actor) if scopes is None else scopes
    )
    return {"Authorization": f"Bearer {token}", **headers}


def create_invoice(client: TestClient, amount: str = "1200.00") -> int:
    response = client.post(
        "/invoices", json={"customer": "ACME Corp", "amount": amount}, headers=auth("alice")
    )
    assert 201 == response.status_code, response.text
    return int(response.json()["id"])


def test_the_invoice_workflow_over_http(client):
    invoice = create_invoice(client)
    assert 200 == client.post(f"/invoices/{invoice}/submit", headers=auth("alice")).status_code
    approved = client.post(f"/invoices/{invoice}/approve", json={"note": "ok"}, headers=auth("bob"))
    assert 200 == approved.status_code
    assert ("approved", "bob") == (approved.json()["state"], approved.json()["approved_by"])
    assert '"3"' == approved.headers["etag"]


def test_a_denial_is_a_problem_document_with_a_stable_code(client):
    invoice = create_invoice(client)
    client.post(f"/invoices/{invoice}/submit", headers=auth("alice"))
    response = client.post(
        f"/invoices/{invoice}/approve",
        headers=auth("alice", scopes=["invoices:read", "invoices:write", "invoices:approve"]),
    )
    assert (403, PROBLEM) == (response.status_code, response.headers["content-type"])
    body = response.json()
    assert ("forbidden", 403) == (body["code"], body["status"])
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text


def test_a_token_without_the_scope_cannot_approve_even_for_an_approver(client):
    invoice = create_invoice(client)
    client.post(f"/invoices/{invoice}/submit", headers=auth("alice"))
    response = client.post(
        f"/invoices/{invoice}/approve", headers=auth("bob", scopes=["invoices:read"])
    )
    assert 403 == response.status_code
    assert "invoices:approve" in response.json()["detail"]


def test_an_approval_above_the_limit_is_denied(client):
    invoice = create_invoice(client, amount="9000.00")
    client.post(f"/invoices/{invoice}/submit", headers=auth("alice"))
    assert 403 == client.post(f"/invoices/{invoice}/approve", headers=auth("bob")).status_code
    assert 200 == client.post(f"/invoices/{invoice}/approve", headers=auth("carol")).status_code


def test_another_tenants_invoice_is_404(client):
    invoice = create_invoice(client)
    response = client.get(f"/invoices/{invoice}", headers=auth("gina"))
    assert (404, "not_found") == (response.status_code, response.json()["code"])


def test_reads_are_audited(client):
    invoice = create_invoice(client)
    assert 200 == client.get(f"/invoices/{invoice}", headers=auth("bob")).status_code
    charter: Charter = client.app_state.charter
    history = charter.history("invoices", invoice)
    assert ["invoice.create", "invoice.get"] == [h["action"] for h in history]
    assert "http" == history[-1]["channel"]


def test_missing_and_bad_tokens_are_401(client):
    assert 401 == client.post("/invoices", json={}).status_code
    bad = client.post("/invoices", json={}, headers={"Authorization": "Bearer nope"})
    assert ("unauthenticated", PROBLEM) == (bad.json()["code"], bad.headers["content-type"])


def test_unknown_fields_and_malformed_json_are_clear_errors(client):
    extra = client.post(
        "/invoices",
        json={"customer": "x", "amount": "1", "state": "approved"},
        headers=auth("alice"),
    )
    assert (422, ["state"]) == (extra.status_code, extra.json()["errors"][0]["loc"])
    broken = client.post(
        "/invoices", content=b"{nope", headers={**auth("alice"), "Content-Type": "application/json"}
    )
    assert (400, "malformed_body") == (broken.status_code, broken.json()["code"])


def test_bodies_over_the_limit_are_refused_with_413(client):
    response = client.post(
        "/invoices",
        content=b"{" + b" " * (70 * 1024) + b"}",
        headers={**auth("alice"), "Content-Type": "application/json"},
    )
    assert (413, "payload_too_large") == (response.status_code, response.json()["code"])


def test_if_match_guards_against_lost_updates(client):
    invoice = create_invoice(client)
    stale = client.post(f"/invoices/{invoice}/submit", headers=auth("alice", **{"If-Match": '"7"'}))
    assert (412, "precondition_failed") == (stale.status_code, stale.json()["code"])
    fresh = client.post(f"/invoices/{invoice}/submit", headers=auth("alice", **{"If-Match": '"1"'}))
    assert 200 == fresh.status_code


def test_support_acts_on_behalf_of_a_user_only_with_a_reason(client):
    invoice = create_invoice(client)
    opened = client.post(
        "/support/sessions", json={"user": "alice"},
        headers=auth("sam", **{"X-Charter-Reason": "ticket 1234"}),
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {opened.json()['token']}"}
    missing = client.post(f"/invoices/{invoice}/submit", headers=headers)
    assert (400, "reason_required") == (missing.status_code, missing.json()["code"])
    ok = client.post(
        f"/invoices/{invoice}/submit", headers={**headers, "X-Charter-Reason": "ticket 1234"}
    )
    assert 200 == ok.status_code
    entry = client.app_state.charter.history("invoices", invoice)[-1]
    assert ("alice", "sam", "ticket 1234") == (
        entry["subject"],
        entry["real_actor"],
        entry["reason"],
    )


def test_a_client_request_id_is_echoed_and_a_bad_one_replaced(client):
    good = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert (200, "abc-123") == (good.status_code, good.headers["x-request-id"])
    bad = client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert "x" * 500 != bad.headers["x-request-id"]


def test_unknown_routes_are_problems_too(client):
    response = client.get("/nope")
    assert (404, PROBLEM, "route_not_found") == (
        response.status_code,
        response.headers["content-type"],
        response.json()["code"],
    )


def test_a_lost_database_is_a_retryable_503(tmp_path):
    charter = Charter(
        database_url=f"sqlite:///{tmp_path}/missing/dir/db.sqlite", audit_keys=SETTINGS.audit_keys
    )
    app = create_app(SETTINGS, charter=charter)
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: no migration
    response = client.post(
        "/invoices", json={"customer": "x", "amount": "1"}, headers=auth("alice")
    )
    assert (503, "storage_unavailable") == (response.status_code, response.json()["code"])
    assert "Retry-After" in response.headers
    assert 503 == client.get("/healthz").status_code


def test_the_service_refuses_to_start_without_secrets_outside_development():
    with pytest.raises(ConfigurationError):
        Settings.from_env({"CHARTER_ENV": "production"})
    with pytest.raises(ConfigurationError):
        Settings.from_env(
            {
                "CHARTER_ENV": "production",
                "CHARTER_TOKEN_SECRET": DEVELOPMENT_TOKEN_SECRET,
                "CHARTER_AUDIT_KEY": "k:0123456789abcdef0123",
            }
        )
    settings = Settings.from_env(
        {
            "CHARTER_ENV": "production",
            "CHARTER_TOKEN_SECRET": "s" * 40,
            "CHARTER_AUDIT_KEY": "k:0123456789abcdef0123",
        }
    )
    assert not settings.development


def submitted_invoices(client: TestClient, amounts: list[str]) -> list[int]:
    ids = [create_invoice(client, amount) for amount in amounts]
    for invoice in ids:
        client.post(f"/invoices/{invoice}/submit", headers=auth("alice"))
    return ids


def test_the_invoice_list_is_filtered_in_sql_to_the_callers_tenant(client):
    ids = submitted_invoices(client, ["10.00", "20.00"])
    mine = client.get("/invoices", headers=auth("bob")).json()
    assert ids == [item["id"] for item in mine["items"]]
    assert [] == client.get("/invoices", headers=auth("gina")).json()["items"]


def test_the_approval_queue_holds_only_what_the_approver_may_approve(client):
    small, big = submitted_invoices(client, ["100.00", "9000.00"])
    assert [small] == [
        i["id"] for i in client.get("/approvals", headers=auth("bob")).json()["items"]
    ]
    assert [small, big] == [
        i["id"] for i in client.get("/approvals", headers=auth("carol")).json()["items"]
    ]
    # alice's token carries no invoices:approve: she is told so, not shown an empty queue.
    refused = client.get("/approvals", headers=auth("alice"))
    assert (403, "forbidden") == (refused.status_code, refused.json()["code"])
    member = client.get("/approvals", headers=auth("alice", scopes=["invoices:approve"]))
    assert [] == member.json()["items"]  # with the scope: the rules still leave nothing


def test_the_page_size_is_capped_by_the_server(client):
    submitted_invoices(client, ["1.00", "2.00", "3.00"])
    page = client.get("/invoices?limit=2", headers=auth("bob")).json()
    assert (2, 2) == (len(page["items"]), page["limit"])
    rest = client.get(f"/invoices?limit=2&after={page['next']}", headers=auth("bob")).json()
    assert (1, None) == (len(rest["items"]), rest["next"])
    assert 200 == client.get("/invoices?limit=100000", headers=auth("bob")).json()["limit"]


def test_next_actions_say_what_is_allowed_and_why_not(client):
    invoice = create_invoice(client, "9000.00")
    client.post(f"/invoices/{invoice}/submit", headers=auth("alice"))
    actions = client.get(f"/invoices/{invoice}/actions", headers=auth("bob")).json()
    assert (True, False, False) == (
        actions["invoice.get"]["allowed"],
        actions["invoice.approve"]["allowed"],
        actions["invoice.submit"]["allowed"],
    )
    assert 404 == client.get(f"/invoices/{invoice}/actions", headers=auth("gina")).status_code


def test_a_denial_is_explained_in_the_audit_trail_with_the_failed_condition(client):
    invoice = create_invoice(client, "9000.00")
    client.post(f"/invoices/{invoice}/submit", headers=auth("alice"))
    assert 403 == client.post(f"/invoices/{invoice}/approve", headers=auth("bob")).status_code
    denial = client.app_state.charter.history("invoices", invoice)[-1]
    assert "R.amount 9000.00 <= A.approval_limit 5000 is false" in denial["detail"]["failed"]


def test_idempotency_key_header_replays_with_the_marker_and_refuses_reuse(client):
    headers = auth("alice", **{"Idempotency-Key": "create-1"})
    first = client.post("/invoices", json={"customer": "ACME", "amount": "10.00"}, headers=headers)
    again = client.post("/invoices", json={"customer": "ACME", "amount": "10.0"}, headers=headers)
    assert (201, 201, first.json()) == (first.status_code, again.status_code, again.json())
    assert ("true", None) == (
        again.headers.get("idempotent-replayed"),
        first.headers.get("idempotent-replayed"),
    )
    other = client.post("/invoices", json={"customer": "Other", "amount": "10.00"}, headers=headers)
    assert (422, "idempotency_key_reused") == (other.status_code, other.json()["code"])
    bad = client.post(
        "/invoices",
        json={"customer": "ACME", "amount": "1"},
        headers=auth("alice", **{"Idempotency-Key": "x" * 256}),
    )
    assert (400, "idempotency_key_invalid") == (bad.status_code, bad.json()["code"])
    assert 1 == len(client.get("/invoices", headers=auth("bob")).json()["items"])


def test_a_required_key_missing_over_http_is_400(client):
    invoice = create_invoice(client)
    response = client.post(f"/invoices/{invoice}/pay", headers=auth("carol"))
    assert (400, "idempotency_key_missing") == (response.status_code, response.json()["code"])


def test_support_finds_an_invoice_by_the_providers_charge_id_within_its_tenant(client):
    invoice = create_invoice(client)
    charter: Charter = client.app_state.charter
    with charter.engine.begin() as conn:
        conn.execute(
            Invoice.__table__.update().where(Invoice.id == invoice).values(charge_id="ch_42")
        )
    found = client.get("/charges/ch_42/invoice", headers=auth("bob"))
    assert (200, invoice) == (found.status_code, found.json()["id"])
    foreign = client.get("/charges/ch_42/invoice", headers=auth("gina"))
    assert (404, "not_found") == (foreign.status_code, foreign.json()["code"])
    assert 404 == client.get("/charges/ch_nope/invoice", headers=auth("bob")).status_code
    assert "invoice.find_by_charge" == charter.history("invoices", invoice)[-1]["action"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('{"customer": "x", "amount": "1", "amount": "900"}', "twice"),
        ('{"customer": "x", "amount": ' + "9" * 5000 + "}", "longer than"),
        ('{"customer": "x", "amount": NaN}', "not a JSON value"),
        ('{"customer": "x", "amount": "1", "meta": ' + "[" * 1000 + "]" * 1000 + "}", "nested"),
        ('{"customer": "x", "amount": "1", "meta": ' + "[" * 40 + "]" * 40 + "}", "nested"),
    ],
)
def test_a_body_that_json_loads_would_bend_is_a_clear_400_and_nothing_is_created(
    client, body, says
):
    response = client.post(
        "/invoices", content=body, headers=auth("alice", **{"Content-Type": "application/json"})
    )
    assert (400, "malformed_body") == (response.status_code, response.json()["code"])
    assert says in response.json()["detail"]
    assert 200 == client.get("/healthz").status_code  # the connection and service live on
    charter: Charter = client.app_state.charter
    with charter.session() as session:
        assert [] == session.execute(select(Invoice)).all()


def test_an_idempotency_key_is_an_sf_string_quoted_or_not_and_sent_once():
    from charter.integrations.fastapi import idempotency_key

    assert "k-1" == idempotency_key(['"k-1"']) == idempotency_key(["k-1"])
    assert 'say "hi"\\' == idempotency_key(['"say \\"hi\\"\\\\"'])
    assert None is idempotency_key([])
    for malformed in (['"a\\b"'], ['"a"b"'], ['"a\\"'], ["a", "b"]):
        with pytest.raises(IdempotencyKeyInvalid):
            idempotency_key(malformed)


def test_a_quoted_key_replays_the_bare_one_and_two_key_fields_are_400(client):
    body = {"customer": "ACME", "amount": "10.00"}
    first = client.post("/invoices", json=body, headers=auth("alice", **{"Idempotency-Key": "k-7"}))
    quoted = client.post(
        "/invoices", json=body, headers=auth("alice", **{"Idempotency-Key": '"k-7"'})
    )
    assert (201, first.json(), "true") == (
        quoted.status_code,
        quoted.json(),
        quoted.headers.get("idempotent-replayed"),
    )
    token = auth("alice")["Authorization"]
    twice = client.post(
        "/invoices",
        json=body,
        headers=[("Authorization", token), ("Idempotency-Key", "k-8"), ("Idempotency-Key", "k-9")],
    )
    assert (400, "idempotency_key_invalid") == (twice.status_code, twice.json()["code"])
    assert 1 == len(client.get("/invoices", headers=auth("bob")).json()["items"])


def test_a_content_length_of_thousands_of_digits_is_413_with_the_request_id(client):
    """int() refuses strings of more than 4,300 digits: that ValueError was a 500, outside the
    layer that adds X-Request-ID."""
    answer = client.post("/invoices", content=b"{}", headers={
        **auth("alice"), "Content-Type": "application/json", "Content-Length": "9" * 5000,
    })  # fmt: skip
    assert (413, "payload_too_large") == (answer.status_code, answer.json()["code"])
    assert answer.headers["x-request-id"]
