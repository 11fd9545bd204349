"""Issue 11 (bulk actions), attacked over HTTP against the reference service.

``POST /invoices/bulk`` creates invoices per item; ``POST /invoices/bulk-approve``
approves a list of invoices all or nothing. A batch is an IDOR at scale unless
each item is authorized against its own record: another tenant's invoice mixed
into a batch must be refused exactly as a missing one, and never applied.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from charter import Charter
from charter.demo.app import create_app
from tests.integrations.test_fastapi import SETTINGS, auth, create_invoice


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    charter = Charter(database_url=database_url, audit_keys=SETTINGS.audit_keys)
    app = create_app(SETTINGS, charter=charter)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def submitted(client: TestClient, user: str = "alice", amount: str = "100.00") -> int:
    response = client.post(
        "/invoices", json={"customer": "ACME Corp", "amount": amount}, headers=auth(user)
    )
    assert 201 == response.status_code, response.text
    invoice = int(response.json()["id"])
    assert 200 == client.post(f"/invoices/{invoice}/submit", headers=auth(user)).status_code
    return invoice


def state(client: TestClient, invoice: int, user: str = "alice") -> str:
    response = client.get(f"/invoices/{invoice}", headers=auth(user))
    assert 200 == response.status_code, response.text
    return str(response.json()["state"])


def test_bulk_create_applies_each_valid_item_and_states_the_partial_success(client):
    items = [
        {"customer": "A", "amount": "10.00"},
        {"customer": "B", "amount": "ten"},  # invalid: refused alone
        {"customer": "C", "amount": "30.00", "tenant_id": "globex"},  # mass assignment
        {"customer": "D", "amount": "40.00"},
    ]
    response = client.post(
        "/invoices/bulk", json={"items": items}, headers=auth("alice", **{"Idempotency-Key": "b1"})
    )
    assert 200 == response.status_code, response.text
    body = response.json()
    assert (2, 2, True) == (body["applied"], body["refused"], body["partial"])
    assert ["applied", "refused", "refused", "applied"] == [i["status"] for i in body["items"]]
    assert [201, 422, 422, 201] == [i["http_status"] for i in body["items"]]
    created = [i["body"] for i in body["items"] if i["status"] == "applied"]
    assert [("A", "acme"), ("D", "acme")] == [(c["customer"], c["tenant"]) for c in created]
    # The same key and items: the whole stored result, nothing created again.
    again = client.post(
        "/invoices/bulk", json={"items": items}, headers=auth("alice", **{"Idempotency-Key": "b1"})
    )
    assert (200, body, "true") == (
        again.status_code, again.json(), again.headers.get("idempotent-replayed")
    )  # fmt: skip
    listed = client.get("/invoices", headers=auth("alice")).json()["items"]
    assert 2 == len(listed)
    # The same key with other items: 422, nothing created.
    other = client.post(
        "/invoices/bulk",
        json={"items": items[:1]},
        headers=auth("alice", **{"Idempotency-Key": "b1"}),
    )
    assert (422, "idempotency_key_reused") == (other.status_code, other.json()["code"])


def test_bulk_approve_with_a_foreign_invoice_fails_whole_and_reports_it_as_missing(client):
    own = [submitted(client), submitted(client)]
    foreign = submitted(client, user="gina")
    missing = foreign + 1000
    response = client.post(
        "/invoices/bulk-approve",
        json={"items": [own[0], foreign, own[1], missing]},
        headers=auth("bob"),
    )
    assert 422 == response.status_code, response.text
    problem = response.json()
    assert "batch_failed" == problem["code"]
    failures = {f["position"]: f for f in problem["failures"]}
    assert [1, 3] == sorted(failures)
    assert {k: v for k, v in failures[1].items() if k not in ("position", "message")} == {
        k: v for k, v in failures[3].items() if k not in ("position", "message")
    }
    assert f"invoices {foreign} was not found" == failures[1]["message"]
    assert f"invoices {missing} was not found" == failures[3]["message"]
    assert ["submitted", "submitted"] == [state(client, i) for i in own]
    assert "submitted" == state(client, foreign, user="gina")
    # Without the foreign id every invoice is approved, in one transaction.
    ok = client.post(
        "/invoices/bulk-approve",
        json={"items": [{"target": own[1], "input": {"note": "ok"}}, own[0]]},
        headers=auth("bob"),
    )
    assert 200 == ok.status_code, ok.text
    assert (2, False) == (ok.json()["applied"], ok.json()["partial"])
    assert ["approved", "approved"] == [state(client, i) for i in own]


def test_bulk_approve_refuses_what_the_single_approval_refuses(client):
    mine = submitted(client, user="bob")  # bob may not approve his own invoice
    big = submitted(client, amount="9000.00")  # over bob's approval limit
    fine = submitted(client)
    response = client.post(
        "/invoices/bulk-approve", json={"items": [fine, mine, big]}, headers=auth("bob")
    )
    assert 422 == response.status_code
    assert [(1, "forbidden"), (2, "forbidden")] == [
        (f["position"], f["code"]) for f in response.json()["failures"]
    ]
    assert "submitted" == state(client, fine)


@pytest.mark.parametrize(
    "body",
    [{"items": []}, {"items": [1] * 1001}, {"items": 5}, {"things": [1]}, {"items": [1], "x": 1}],
)
def test_a_malformed_empty_or_oversized_batch_is_refused_with_nothing_applied(client, body):
    invoice = submitted(client)
    if body.get("items") == [1] * 1001:
        body = {"items": [invoice] * 1001}
    response = client.post("/invoices/bulk-approve", json=body, headers=auth("bob"))
    expected = {0: (400, "batch_empty"), 1001: (413, "batch_too_large")}.get(
        len(body["items"]) if isinstance(body.get("items"), list) and len(body) == 1 else -1,
        (422, "invalid_input"),
    )
    assert expected == (response.status_code, response.json()["code"]), response.text
    assert "submitted" == state(client, invoice)


def test_the_bulk_routes_are_in_the_openapi_document(client):
    document = client.get("/openapi.json").json()
    create = document["paths"]["/invoices/bulk"]["post"]
    approve = document["paths"]["/invoices/bulk-approve"]["post"]
    items = create["requestBody"]["content"]["application/json"]["schema"]["properties"]["items"]
    assert (1, 1000) == (items["minItems"], items["maxItems"])
    assert "Idempotency-Key" in [p["name"] for p in create["parameters"]]
    assert {"200", "400", "413"} <= set(create["responses"])
    assert "422" in approve["responses"]
    assert "per_item" == create["x-charter"]["bulk"]
    assert "all_or_nothing" == approve["x-charter"]["bulk"]


def test_a_created_invoice_of_a_bulk_request_is_the_same_as_a_single_one(client):
    single = create_invoice(client, "5.00")
    response = client.post(
        "/invoices/bulk",
        json={"items": [{"customer": "ACME Corp", "amount": "5.00"}]},
        headers=auth("alice"),
    )
    (item,) = response.json()["items"]
    one = client.get(f"/invoices/{single}", headers=auth("alice")).json()
    assert {k: v for k, v in one.items() if k != "id"} == {
        k: v for k, v in item["body"].items() if k != "id"
    }
