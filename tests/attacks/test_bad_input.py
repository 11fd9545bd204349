"""Issue 9, section 3: bad input is a clear 4xx, never a 500 and never unaudited.

Over HTTP against the reference service, on SQLite and PostgreSQL (where the
500s were: PostgreSQL refuses a NUL character in text and an INTEGER parameter
of 2**31 or more). Then the same guarantees at the gate, for every channel.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import BigInteger, Integer, SmallInteger, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from charter import Actor, Charter, InvalidInput, NotFound
from charter.demo.models import Invoice
from charter.errors import InvalidPage
from charter.resources import ColumnDomain, ResourceSpec
from tests.app import Doc
from tests.integrations.test_fastapi import auth, client, create_invoice

__all__ = ["client"]  # the reference service's TestClient fixture, per database

INT32_MAX = 2**31 - 1


def invoices(client: TestClient) -> int:
    with client.app_state.charter.session() as session:
        return int(session.scalar(select(func.count()).select_from(Invoice)))


def audited_not_found(client: TestClient, resource_id: str) -> list[dict[str, Any]]:
    history = client.app_state.charter.history("invoices", resource_id)
    return [h for h in history if (h["decision"], h["outcome"]) == ("deny", "not_found")]


# -- NUL characters --------------------------------------------------------------------


def test_a_nul_in_a_json_string_is_a_422_naming_the_field_and_writes_nothing(client):
    before = invoices(client)
    response = client.post(
        "/invoices", json={"customer": "ACME\u0000Corp", "amount": "10.00"}, headers=auth("alice")
    )
    assert (422, "invalid_input") == (response.status_code, response.json()["code"])
    assert [{"loc": ["customer"], "type": "string_nul"}] == [
        {"loc": e["loc"], "type": e["type"]} for e in response.json()["errors"]
    ]
    assert before == invoices(client)


def test_a_nul_in_a_member_name_is_a_422_too(client):
    response = client.post(
        "/invoices",
        json={"customer": "ACME", "amount": "1", "no\u0000te": "x"},
        headers=auth("alice"),
    )
    assert 422 == response.status_code
    assert ["no\\u0000te"] in [e["loc"] for e in response.json()["errors"]]


def test_a_nul_in_an_approval_note_is_a_422_not_a_storage_error(client):
    invoice = create_invoice(client)
    client.post(f"/invoices/{invoice}/submit", headers=auth("alice"))
    response = client.post(
        f"/invoices/{invoice}/approve", json={"note": "ok\u0000"}, headers=auth("bob")
    )
    assert (422, ["note"]) == (response.status_code, response.json()["errors"][0]["loc"])
    assert "submitted" == client.get(f"/invoices/{invoice}", headers=auth("bob")).json()["state"]


# -- path ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("id", [str(INT32_MAX + 1), "9" * 40, str(-(2**31) - 1)])
def test_a_path_id_outside_the_column_is_an_audited_404(client, id):
    response = client.get(f"/invoices/{id}", headers=auth("alice"))
    assert (404, "not_found") == (response.status_code, response.json()["code"])
    assert 1 == len(audited_not_found(client, id))


def test_a_keyed_change_on_an_id_outside_the_column_is_an_audited_404(client):
    id = str(2**31)
    response = client.post(
        f"/invoices/{id}/approve", headers=auth("bob", **{"Idempotency-Key": "k-range"})
    )
    assert (404, "not_found") == (response.status_code, response.json()["code"])
    assert 1 == len(audited_not_found(client, id))


def test_a_path_id_with_a_nul_is_an_audited_404_recorded_escaped(client):
    invoice = create_invoice(client)
    response = client.get(f"/invoices/{invoice}%00", headers=auth("alice"))
    assert (404, "not_found") == (response.status_code, response.json()["code"])
    assert 1 == len(audited_not_found(client, f"{invoice}\\x00"))


@pytest.mark.parametrize("id", ["\u0661", "1_0", " 1", "+1", "1.0"])
def test_a_path_id_is_ascii_digits_only(client, id):
    for _ in range(10):  # invoices 1 to 10 exist: the id must not resolve to one of them
        create_invoice(client)
    response = client.get(f"/invoices/{id}", headers=auth("alice"))
    assert (404, "not_found") == (response.status_code, response.json()["code"])


def test_a_lookup_column_value_that_cannot_exist_is_an_audited_404(client):
    for sent, recorded in (("ch%00x", "ch\\x00x"), ("c" * 65, "c" * 65)):
        response = client.get(f"/charges/{sent}/invoice", headers=auth("alice"))
        assert (404, "not_found") == (response.status_code, response.json()["code"])
        assert 1 == len(audited_not_found(client, recorded))


# -- list cursors and limits -------------------------------------------------------------


@pytest.mark.parametrize(
    "query", ["after=" + "9" * 40, f"after={2**31}", "after=abc", "after=\u0661", "after=1_0"]
)
def test_a_cursor_the_service_did_not_issue_is_a_400(client, query):
    response = client.get(f"/invoices?{query}", headers=auth("alice"))
    assert (400, "invalid_cursor") == (response.status_code, response.json()["code"])
    assert "after" == response.json()["parameter"]


@pytest.mark.parametrize("limit", ["\u0661", "1_0", "-1", "x", "9" * 30])
def test_a_limit_that_is_not_ascii_digits_is_a_400(client, limit):
    response = client.get(f"/invoices?limit={limit}", headers=auth("alice"))
    assert (400, "invalid_page") == (response.status_code, response.json()["code"])


def test_a_cursor_the_service_issued_still_pages(client):
    for _ in range(3):
        create_invoice(client)
    first = client.get("/invoices?limit=2", headers=auth("alice")).json()
    second = client.get(f"/invoices?limit=2&after={first['next']}", headers=auth("alice"))
    assert (200, 1) == (second.status_code, len(second.json()["items"]))


# -- at the gate, for every channel ------------------------------------------------------


def make_doc(charter: Charter, actor: Actor) -> int:
    return int(charter.execute(actor, "doc.create", {"title": "t"}).resource_id or 0)


def test_the_gate_refuses_a_nul_in_any_input_string_on_every_channel(charter, alice):
    doc_id = make_doc(charter, alice)
    with pytest.raises(InvalidInput) as refused:
        charter.execute(alice, "doc.rename", {"title": "a\x00b"}, target=doc_id, channel="cli")
    assert [["title"]] == [e["loc"] for e in refused.value.attrs["errors"]]


def test_the_gate_refuses_a_nul_in_the_reason(charter, alice):
    doc_id = make_doc(charter, alice)
    with pytest.raises(InvalidInput) as refused:
        charter.execute(alice, "doc.purge", target=doc_id, reason="cleanup\x00", channel="admin")
    assert [["reason"]] == [e["loc"] for e in refused.value.attrs["errors"]]


@pytest.mark.parametrize("target", [2**31, "2147483648", "\u0661", "1_0", True, 1.0, "1\x00"])
def test_an_id_no_row_can_have_is_not_found_and_audited(charter, alice, target):
    for _ in range(10):  # docs 1 to 10 exist: the id must not resolve to one of them
        make_doc(charter, alice)
    with pytest.raises(NotFound):
        charter.execute(alice, "doc.read", target=target, channel="agent")
    denied = [
        h
        for h in charter.history("test_docs", str(target).replace("\x00", "\\x00"))
        if h["outcome"] == "not_found"
    ]
    assert 1 == len(denied)


@pytest.mark.parametrize("after", [2**40, "1\x00", True])
def test_a_list_cursor_no_row_can_have_is_invalid_page_on_every_channel(client, after):
    charter: Charter = client.app_state.charter
    actor = Actor.make("alice", "acme", roles={"member"}, scopes={"invoices:read"})
    with pytest.raises(InvalidPage):
        charter.list_records(actor, "invoice.get", after=after, channel="agent")


# -- the column domain -------------------------------------------------------------------


class _Base(DeclarativeBase):
    pass


class _Wide(_Base):
    __tablename__ = "domain_wide"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    small: Mapped[int] = mapped_column(SmallInteger)
    plain: Mapped[int] = mapped_column(Integer)
    code: Mapped[str] = mapped_column(String(8))
    text: Mapped[str] = mapped_column(String)


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("plain", "2147483647", INT32_MAX),
        ("plain", 2**31, None),
        ("plain", -(2**31), -(2**31)),
        ("plain", "007", 7),
        ("plain", "\u0661", None),
        ("plain", "1_0", None),
        ("plain", "-1", None),  # from text: ASCII digits only
        ("plain", True, None),
        ("plain", 1.0, None),
        ("small", 2**15, None),
        ("small", 2**15 - 1, 2**15 - 1),
        ("id", 2**40, 2**40),
        ("id", 2**63, None),
        ("id", "9" * 21, None),
        ("code", "abcdefgh", "abcdefgh"),
        ("code", "abcdefghi", None),
        ("code", "ab\x00", None),
        ("code", 12, "12"),
        ("text", "x" * 10_000, "x" * 10_000),
        ("text", "\x00", None),
    ],
)
def test_a_column_domain_holds_what_the_column_can_hold(column, value, expected):
    domain = ColumnDomain.of(_Wide.__table__.c[column])
    assert expected == domain.coerce(value)


def test_a_resource_knows_its_id_domain():
    assert (int, -(2**31), INT32_MAX) == (
        (spec := ResourceSpec.declare(Doc, tenant="tenant_id")).id_domain.python_type,
        spec.id_domain.low,
        spec.id_domain.high,
    )
